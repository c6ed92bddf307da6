{#
  The flight key: one string per flight, built from the columns that are unique together in
  the raw flights table. Format (Python code recomputes it, so keep the two in step):

      YYYY-MM-DD|CARRIER|FLIGHT|ORIGIN|SCHED_DEP_TIME

  year 4 digits, month and day zero-padded to 2 digits, flight and sched_dep_time as plain
  base-10 integers without padding, fields separated by '|'. Example: the first flight of
  2013, UA 1545 from EWR scheduled at 5:15, is '2013-01-01|UA|1545|EWR|515'.
  Python: f"{year:04d}-{month:02d}-{day:02d}|{carrier}|{flight}|{origin}|{sched_dep_time}"
#}
{% macro flight_key(year, month, day, carrier, flight, origin, sched_dep_time) -%}
    {{ dbt.concat([
        "cast(" ~ year ~ " as " ~ dbt.type_string() ~ ")", "'-'",
        zero_pad(month, 2), "'-'",
        zero_pad(day, 2), "'|'",
        carrier, "'|'",
        "cast(" ~ flight ~ " as " ~ dbt.type_string() ~ ")", "'|'",
        origin, "'|'",
        "cast(" ~ sched_dep_time ~ " as " ~ dbt.type_string() ~ ")"
    ]) }}
{%- endmacro %}

{#
  Small cross-warehouse helpers. Each one is dispatched (adapter.dispatch) so a warehouse
  whose SQL differs gets its own implementation: duckdb__ for local runs, bigquery__ for the
  cloud deployments, default__ for anything else.
#}

{#- Integer value of a string of hex digits (at most 15, so it fits a signed 64-bit int).
    DuckDB (BIGINT) and BigQuery (dbt.type_bigint() is INT64 there) both cast a '0x...'
    string as hexadecimal, so one default implementation serves both. -#}
{% macro hex_to_bigint(hex_expr) -%}
    {{ return(adapter.dispatch('hex_to_bigint')(hex_expr)) }}
{%- endmacro %}

{% macro default__hex_to_bigint(hex_expr) -%}
    cast({{ dbt.concat(["'0x'", hex_expr]) }} as {{ dbt.type_bigint() }})
{%- endmacro %}


{#- ISO day of week of a DATE: 1 = Monday .. 7 = Sunday. -#}
{% macro day_of_week(date_expr) -%}
    {{ return(adapter.dispatch('day_of_week')(date_expr)) }}
{%- endmacro %}

{% macro default__day_of_week(date_expr) -%}
    extract(isodow from {{ date_expr }})
{%- endmacro %}

{% macro duckdb__day_of_week(date_expr) -%}
    isodow({{ date_expr }})
{%- endmacro %}

{% macro bigquery__day_of_week(date_expr) -%}
    {#- EXTRACT(DAYOFWEEK) is 1 = Sunday .. 7 = Saturday -#}
    (mod(extract(dayofweek from {{ date_expr }}) + 5, 7) + 1)
{%- endmacro %}


{#- DATE from integer year, month and day expressions (dbt.date only takes literals). -#}
{% macro date_from_parts(year, month, day) -%}
    {{ return(adapter.dispatch('date_from_parts')(year, month, day)) }}
{%- endmacro %}

{% macro default__date_from_parts(year, month, day) -%}
    cast({{ dbt.concat([
        "cast(" ~ year ~ " as " ~ dbt.type_string() ~ ")", "'-'",
        zero_pad(month, 2), "'-'", zero_pad(day, 2)]) }} as date)
{%- endmacro %}

{% macro duckdb__date_from_parts(year, month, day) -%}
    make_date(cast({{ year }} as bigint), cast({{ month }} as bigint), cast({{ day }} as bigint))
{%- endmacro %}

{% macro bigquery__date_from_parts(year, month, day) -%}
    date({{ year }}, {{ month }}, {{ day }})
{%- endmacro %}


{#- An integer expression as a string left-padded with zeros to `width` characters. -#}
{% macro zero_pad(int_expr, width) -%}
    {{ return(adapter.dispatch('zero_pad')(int_expr, width)) }}
{%- endmacro %}

{% macro default__zero_pad(int_expr, width) -%}
    lpad(cast({{ int_expr }} as {{ dbt.type_string() }}), {{ width }}, '0')
{%- endmacro %}


{#- 64-bit floating point type (dbt.type_float() is the 32-bit REAL on DuckDB). -#}
{% macro type_double() -%}
    {{ return(adapter.dispatch('type_double')()) }}
{%- endmacro %}

{% macro default__type_double() -%}
    double precision
{%- endmacro %}

{% macro duckdb__type_double() -%}
    double
{%- endmacro %}

{% macro bigquery__type_double() -%}
    float64
{%- endmacro %}


{#- Comma-separated, sorted list of the distinct values of a string expression. -#}
{% macro string_agg_distinct(expr, delimiter=', ') -%}
    {{ return(adapter.dispatch('string_agg_distinct')(expr, delimiter)) }}
{%- endmacro %}

{% macro default__string_agg_distinct(expr, delimiter) -%}
    string_agg(distinct {{ expr }}, '{{ delimiter }}' order by {{ expr }})
{%- endmacro %}

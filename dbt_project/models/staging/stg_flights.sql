-- One row per scheduled flight, with the flight key every downstream table (and the
-- Python scoring code) joins on. See macros/flight_key.sql for the key's format.
select
    {{ flight_key('year', 'month', 'day', 'carrier', 'flight', 'origin', 'sched_dep_time') }} as flight_key,
    {{ date_from_parts('year', 'month', 'day') }} as flight_date,
    year,
    month,
    day,
    carrier,
    flight,
    tailnum,
    origin,
    dest,
    sched_dep_time,
    hour as sched_dep_hour,
    minute as sched_dep_minute,
    time_hour as scheduled_departure_utc,
    dep_time,
    dep_delay,
    sched_arr_time,
    arr_time,
    arr_delay,
    air_time,
    distance,
    case when dep_time is null then true else false end as is_cancelled
from {{ source('raw', 'flights') }}

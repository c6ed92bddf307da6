-- One row per scheduled flight (cancelled ones included) with the model's input features,
-- the target and the train/test split. The split is decided only by the
-- train_test_split macro (macros/train_test_split.sql).
with flights as (
    select * from {{ ref('stg_flights') }}
),

weather as (
    select * from {{ ref('stg_weather') }}
),

planes as (
    select * from {{ ref('stg_planes') }}
)

select
    flights.flight_key,
    flights.flight_date,
    flights.carrier,
    flights.origin,
    flights.dest,
    flights.sched_dep_hour,
    flights.month,
    {{ day_of_week('flights.flight_date') }} as day_of_week,
    flights.distance,
    weather.temp,
    weather.dewp,
    weather.humid,
    weather.wind_speed,
    weather.wind_gust,
    weather.precip,
    weather.pressure,
    weather.visib,
    planes.plane_year,
    planes.plane_seats,
    flights.is_cancelled,
    flights.dep_delay,
    case
        when flights.is_cancelled = true or flights.dep_delay is null then null
        when flights.dep_delay >= 15 then true
        else false
    end as is_delayed,
    {{ train_test_split('flights.flight_key') }} as split,
    {{ split_bucket('flights.flight_key') }} as split_bucket
from flights
left join weather
    on weather.origin = flights.origin
    and weather.time_hour = flights.scheduled_departure_utc
left join planes
    on planes.tailnum = flights.tailnum

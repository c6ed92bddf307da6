-- What a model trains and is evaluated on: the flights that departed (the target is
-- undefined for cancelled ones), split by the `split` column.
select
    flight_key,
    flight_date,
    carrier,
    origin,
    dest,
    sched_dep_hour,
    month,
    day_of_week,
    distance,
    temp,
    dewp,
    humid,
    wind_speed,
    wind_gust,
    precip,
    pressure,
    visib,
    plane_year,
    plane_seats,
    is_delayed,
    split,
    split_bucket
from {{ ref('flight_features') }}
where is_cancelled = false
  and is_delayed is not null

-- Hourly weather at the NYC airports; joined to flights on (origin, time_hour).
select
    origin,
    time_hour,
    year,
    month,
    day,
    hour,
    temp,
    dewp,
    humid,
    wind_dir,
    wind_speed,
    wind_gust,
    precip,
    pressure,
    visib
from {{ source('raw', 'weather') }}

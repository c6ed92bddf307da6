select
    tailnum,
    year as plane_year,
    type as plane_type,
    manufacturer,
    model,
    engines,
    seats as plane_seats,
    speed,
    engine
from {{ source('raw', 'planes') }}

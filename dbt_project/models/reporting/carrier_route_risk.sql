-- Per carrier and route (origin -> dest) over all scored flights: the mean predicted delay
-- probability (the route's risk as scheduled, cancelled flights included), the predicted
-- and the actual delay rate over the same flights, those that departed, and each route's
-- rank within its carrier by predicted risk (1 = riskiest).
with routes as (
    select
        carrier,
        origin,
        dest,
        count(*) as flights_scored,
        cast(sum(is_cancelled) as {{ dbt.type_bigint() }}) as cancelled_flights,
        count(actual_delayed) as flights_with_outcome,
        avg(delay_probability) as mean_predicted_probability,
        -- Cancelled flights have no outcome: compare like with like.
        avg(case when actual_delayed is not null then delay_probability end)
            as predicted_delay_rate,
        avg(cast(actual_delayed as {{ type_double() }})) as actual_delay_rate
    from {{ ref('scored_flights') }}
    where has_features = 1
    group by carrier, origin, dest
),

airlines as (
    select carrier, airline_name from {{ ref('stg_airlines') }}
)

select
    routes.carrier,
    airlines.airline_name,
    routes.origin,
    routes.dest,
    routes.flights_scored,
    routes.cancelled_flights,
    routes.flights_with_outcome,
    routes.mean_predicted_probability,
    routes.predicted_delay_rate,
    routes.actual_delay_rate,
    row_number() over (
        partition by routes.carrier
        order by
            routes.mean_predicted_probability desc,
            routes.flights_scored desc,
            routes.origin,
            routes.dest
    ) as risk_rank
from routes
left join airlines
    on airlines.carrier = routes.carrier

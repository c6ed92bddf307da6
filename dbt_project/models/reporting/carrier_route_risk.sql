-- Per carrier and route (origin -> dest) over all scored flights: the mean predicted delay
-- probability, the actual delay rate over the flights that departed, and each route's
-- rank within its carrier by predicted risk (1 = riskiest).
with predictions as (
    select * from {{ source('predictions', 'flight_delay_predictions') }}
),

features as (
    select flight_key, carrier, origin, dest, is_cancelled, is_delayed
    from {{ ref('flight_features') }}
),

airlines as (
    select carrier, airline_name from {{ ref('stg_airlines') }}
),

scored as (
    select
        features.carrier,
        features.origin,
        features.dest,
        predictions.delay_probability,
        case when features.is_cancelled = true then 1 else 0 end as is_cancelled,
        case
            when features.is_delayed is null then null
            when features.is_delayed = true then 1
            else 0
        end as actual_delayed
    from predictions
    inner join features
        on features.flight_key = predictions.flight_key
),

routes as (
    select
        carrier,
        origin,
        dest,
        count(*) as flights_scored,
        cast(sum(is_cancelled) as {{ dbt.type_bigint() }}) as cancelled_flights,
        count(actual_delayed) as flights_with_outcome,
        avg(delay_probability) as mean_predicted_probability,
        avg(cast(actual_delayed as {{ type_double() }})) as actual_delay_rate
    from scored
    group by carrier, origin, dest
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
    routes.actual_delay_rate,
    row_number() over (
        partition by routes.carrier
        order by routes.mean_predicted_probability desc, routes.flights_scored desc, routes.origin, routes.dest
    ) as risk_rank
from routes
left join airlines
    on airlines.carrier = routes.carrier

-- Per scheduled flight date: how many flights were scored, how many of them were
-- cancelled, the predicted vs. actual delay rate and the Brier score over the flights
-- that departed (the only ones with an actual outcome).
with predictions as (
    select * from {{ source('predictions', 'flight_delay_predictions') }}
),

features as (
    select flight_key, is_cancelled, is_delayed
    from {{ ref('flight_features') }}
),

scored as (
    select
        predictions.flight_date,
        predictions.delay_probability,
        predictions.model_version,
        predictions.scored_at,
        case when features.flight_key is null then 1 else 0 end as is_unmatched,
        case when features.is_cancelled = true then 1 else 0 end as is_cancelled,
        case
            when features.is_delayed is null then null
            when features.is_delayed = true then 1
            else 0
        end as actual_delayed
    from predictions
    left join features
        on features.flight_key = predictions.flight_key
)

select
    flight_date,
    count(*) as flights_scored,
    cast(sum(is_cancelled) as {{ dbt.type_bigint() }}) as cancelled_flights,
    count(actual_delayed) as flights_with_outcome,
    cast(sum(is_unmatched) as {{ dbt.type_bigint() }}) as flights_without_features,
    avg(case when actual_delayed is not null then delay_probability end) as predicted_delay_rate,
    avg(cast(actual_delayed as {{ type_double() }})) as actual_delay_rate,
    avg((delay_probability - actual_delayed) * (delay_probability - actual_delayed)) as brier_score,
    {{ string_agg_distinct('model_version') }} as model_versions,
    max(scored_at) as last_scored_at
from scored
group by flight_date

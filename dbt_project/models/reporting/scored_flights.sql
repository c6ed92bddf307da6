{{ config(materialized='view') }}
-- Every scored flight beside its outcome: the one place the reporting models join the
-- predictions to the flights. actual_delayed is 1/0 for flights that departed and null
-- for cancelled ones (their delay is undefined); has_features is 0 for a prediction whose
-- flight is no longer in flight_features.
with predictions as (
    select * from {{ source('predictions', 'flight_delay_predictions') }}
),

features as (
    select flight_key, carrier, origin, dest, is_cancelled, is_delayed
    from {{ ref('flight_features') }}
)

select
    predictions.flight_key,
    predictions.flight_date,
    features.carrier,
    features.origin,
    features.dest,
    predictions.delay_probability,
    predictions.model_version,
    predictions.scored_at,
    case when features.flight_key is null then 0 else 1 end as has_features,
    case when features.is_cancelled = true then 1 else 0 end as is_cancelled,
    case
        when features.is_delayed is null then null
        when features.is_delayed = true then 1
        else 0
    end as actual_delayed
from predictions
left join features
    on features.flight_key = predictions.flight_key

-- Calibration of the delay probabilities: the scored flights that departed, cut into ten
-- equal-count deciles of predicted probability (1 = lowest), with the mean prediction
-- against the actual delay rate in each.
with predictions as (
    select * from {{ source('predictions', 'flight_delay_predictions') }}
),

features as (
    select flight_key, is_delayed
    from {{ ref('flight_features') }}
    where is_delayed is not null
),

scored as (
    select
        predictions.flight_key,
        predictions.delay_probability,
        predictions.model_version,
        case when features.is_delayed = true then 1 else 0 end as actual_delayed
    from predictions
    inner join features
        on features.flight_key = predictions.flight_key
),

deciles as (
    select
        scored.*,
        ntile(10) over (order by delay_probability, flight_key) as decile
    from scored
)

select
    decile,
    count(*) as flights,
    min(delay_probability) as min_predicted_probability,
    max(delay_probability) as max_predicted_probability,
    avg(delay_probability) as mean_predicted_probability,
    avg(cast(actual_delayed as {{ type_double() }})) as actual_delay_rate,
    avg(delay_probability) - avg(cast(actual_delayed as {{ type_double() }})) as calibration_gap,
    {{ string_agg_distinct('model_version') }} as model_versions
from deciles
group by decile

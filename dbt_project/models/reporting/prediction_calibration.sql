-- Calibration of the delay probabilities: the scored flights that departed, cut into ten
-- equal-count deciles of predicted probability (1 = lowest), with the mean prediction
-- against the actual delay rate in each.
with deciles as (
    select
        delay_probability,
        model_version,
        actual_delayed,
        ntile(10) over (order by delay_probability, flight_key) as decile
    from {{ ref('scored_flights') }}
    where actual_delayed is not null
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

-- Calibration of the delay probabilities, per model version (two models' probabilities are
-- not on one scale): each model's scored flights that departed, cut into ten equal-count
-- deciles of predicted probability (1 = lowest), with the mean prediction against the
-- actual delay rate in each.
with deciles as (
    select
        delay_probability,
        model_version,
        actual_delayed,
        ntile(10) over (
            partition by model_version order by delay_probability, flight_key
        ) as decile
    from {{ ref('scored_flights') }}
    where actual_delayed is not null
)

select
    model_version,
    decile,
    count(*) as flights,
    min(delay_probability) as min_predicted_probability,
    max(delay_probability) as max_predicted_probability,
    avg(delay_probability) as mean_predicted_probability,
    avg(cast(actual_delayed as {{ type_double() }})) as actual_delay_rate,
    avg(delay_probability) - avg(cast(actual_delayed as {{ type_double() }})) as calibration_gap
from deciles
group by model_version, decile

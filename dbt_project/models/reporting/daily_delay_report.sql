-- Per scheduled flight date: how many flights were scored, how many of them were
-- cancelled, the predicted vs. actual delay rate and the Brier score over the flights
-- that departed (the only ones with an actual outcome).
select
    flight_date,
    count(*) as flights_scored,
    cast(sum(is_cancelled) as {{ dbt.type_bigint() }}) as cancelled_flights,
    count(actual_delayed) as flights_with_outcome,
    cast(sum(1 - has_features) as {{ dbt.type_bigint() }}) as flights_without_features,
    avg(case when actual_delayed is not null then delay_probability end) as predicted_delay_rate,
    avg(cast(actual_delayed as {{ type_double() }})) as actual_delay_rate,
    avg((delay_probability - actual_delayed) * (delay_probability - actual_delayed)) as brier_score,
    {{ string_agg_distinct('model_version') }} as model_versions,
    max(scored_at) as last_scored_at
from {{ ref('scored_flights') }}
group by flight_date

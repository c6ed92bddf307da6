-- Every flight's split bucket must be in 0..9 and agree with its split; with enough flights
-- (1,000 or more, so a small dev data set does not fail by chance) all ten buckets must be
-- used and the test set must hold 15 %..25 % of flights (it targets 20 %).
-- Returns a row, i.e. fails, when any of this is not so.
with features as (
    select split, split_bucket
    from {{ ref('flight_features') }}
),

summary as (
    select
        count(*) as n_flights,
        sum(case when split = 'test' then 1 else 0 end) as n_test,
        sum(case when split_bucket < 0 or split_bucket > 9 or split_bucket is null then 1 else 0 end) as n_bad_bucket,
        count(distinct split_bucket) as n_buckets,
        sum(case when split = 'test' and split_bucket >= {{ test_split_buckets() }} then 1
                 when split = 'train' and split_bucket < {{ test_split_buckets() }} then 1
                 else 0 end) as n_inconsistent
    from features
)

select *
from summary
where n_bad_bucket > 0
   or n_inconsistent > 0
   or (
    n_flights >= 1000
    and (
      n_buckets <> 10
      or cast(n_test as {{ type_double() }}) < 0.15 * cast(n_flights as {{ type_double() }})
      or cast(n_test as {{ type_double() }}) > 0.25 * cast(n_flights as {{ type_double() }})
    )
  )

{#
  Fails once per combination of the columns that occurs more than once. Our own version
  of dbt_utils.unique_combination_of_columns, which this project cannot install.
#}
{% test unique_combination_of_columns(model, combination_of_columns) %}
select
    {{ combination_of_columns | join(', ') }},
    count(*) as n_rows
from {{ model }}
group by {{ combination_of_columns | join(', ') }}
having count(*) > 1
{% endtest %}

{#
  Fails on every row whose column is outside [min_value, max_value] (NULLs pass; pair
  with not_null where needed). Our own version of dbt_utils.accepted_range, which this
  project cannot install.
#}
{% test value_between(model, column_name, min_value=none, max_value=none) %}
select {{ column_name }}
from {{ model }}
where {{ column_name }} is not null
  and (
    1 = 0
    {%- if min_value is not none %} or {{ column_name }} < {{ min_value }}{% endif %}
    {%- if max_value is not none %} or {{ column_name }} > {{ max_value }}{% endif %}
  )
{% endtest %}

{#
  Every model's schema (BigQuery dataset) comes from the `datasets` var, which
  ml_platform/settings.py computes per deployment (a branch deployment's names carry
  the pull request suffix). Deriving names only in Python keeps the rule that a branch
  can never write to a prod dataset in one place.
#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {%- if custom_schema_name is none -%}
        {{ exceptions.raise_compiler_error("model " ~ node.name ~ " has no +schema; every model must name its dataset") }}
    {%- endif -%}
    {%- set datasets = var('datasets') -%}
    {%- if custom_schema_name not in datasets -%}
        {{ exceptions.raise_compiler_error("unknown dataset '" ~ custom_schema_name ~ "' for model " ~ node.name ~ "; known: " ~ datasets.keys() | list | join(', ')) }}
    {%- endif -%}
    {{ datasets[custom_schema_name] }}
{%- endmacro %}

{#
  The train/test split. These macros are the ONLY place that decides which flights a
  model trains on and which it is evaluated on; Python code that needs the split for a
  single key recomputes it as

      bucket = int(hashlib.md5(key.encode()).hexdigest()[:15], 16) % 10
      split  = "test" if bucket < 2 else "train"

  tests/unit/test_dbt_split_macro.py checks that the SQL and the Python formula agree.
#}

{#- Deterministic bucket 0..9 of a string key: the integer value of the first 15 hex
    characters (60 bits, so it fits a signed BIGINT/INT64) of the lowercase MD5 hex digest
    of the key, modulo 10. dbt.hash is md5() on DuckDB and to_hex(md5()) on BigQuery, both
    lowercase hex; both warehouses cast a '0x...' string to an integer; mod() exists in
    both (BigQuery has no % operator). -#}
{% macro split_bucket(key_expr) -%}
    mod({{ hex_to_bigint("substr(" ~ dbt.hash(key_expr) ~ ", 1, 15)") }}, 10)
{%- endmacro %}

{#- Number of buckets (out of 10) that go to the test set: 2, i.e. 20 % test. -#}
{% macro test_split_buckets() -%}
    {{ return(2) }}
{%- endmacro %}

{#- 'test' for buckets 0 and 1, 'train' for buckets 2..9. -#}
{% macro train_test_split(key_expr) -%}
    case when {{ split_bucket(key_expr) }} < {{ test_split_buckets() }} then 'test' else 'train' end
{%- endmacro %}

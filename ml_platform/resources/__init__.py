"""Outside systems, one interface each, with a local and a Google Cloud implementation.

Kept empty on purpose: pipeline components and the local worker import these modules in
processes of their own, which should not pay for importing Dagster.
"""

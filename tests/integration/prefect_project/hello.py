"""A trivial flow deployed by the scale-out test (Prefect server on PostgreSQL, run by a worker)."""

from prefect import flow


@flow(name="scale-out-hello")
def hello(value: int) -> int:
    return value + 1

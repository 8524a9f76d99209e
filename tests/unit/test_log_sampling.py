from trading.log_sampling import worth_logging


def test_first_then_one_in_every() -> None:
    assert [n for n in range(1, 3001) if worth_logging(n)] == [1, 1000, 2000, 3000]
    assert [n for n in range(1, 11) if worth_logging(n, every=5)] == [1, 5, 10]

import urllib.request

from trading.metrics import IngestMetrics, sample_value


def test_counters_by_label_and_served_on_loopback() -> None:
    metrics = IngestMetrics()
    metrics.messages("book", "BTC-EUR").inc()
    metrics.messages("book", "BTC-EUR").inc(2)
    metrics.gaps("book", "ETH-EUR", "nonce_gap").inc()
    assert sample_value(metrics.registry, "ingest_messages_total", {"channel": "book", "market": "BTC-EUR"}) == 3
    endpoint = metrics.endpoint(port=0).start()
    try:
        assert endpoint.host == "127.0.0.1" and endpoint.port > 0
        with urllib.request.urlopen(endpoint.url, timeout=5) as response:
            text = response.read().decode()
        assert 'ingest_messages_total{channel="book",market="BTC-EUR"} 3.0' in text
        assert 'ingest_gaps_total{channel="book",kind="nonce_gap",market="ETH-EUR"} 1.0' in text
    finally:
        endpoint.stop()


def test_two_loops_in_one_process_do_not_clash() -> None:
    first, second = IngestMetrics(), IngestMetrics()
    first.reconnects("book").inc()
    assert sample_value(second.registry, "ingest_reconnects_total", {"channel": "book"}) is None

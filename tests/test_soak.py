"""A short soak (the full one: `python -m benchmarks.bench_soak`): a real `lorakit serve` process,
client threads with mixed adapters, dropped streams and clients that give up, hot load / unload /
replace, and a hostile request every few requests. 5xx responses, hangs, wrong answers (vs the
same request sent alone) and memory growth must all be zero."""

from benchmarks.bench_soak import build_site, soak


def test_short_soak_has_no_5xx_hangs_wrong_answers_or_memory_growth(tmp_path):
    report = soak(build_site(tmp_path), seconds=20, clients=4, hostile_every=3, log=tmp_path / "server.log")
    counts = {k: report[k] for k in ("5xx", "hangs", "wrong", "memory_grew")}
    detail = (report["examples"], (tmp_path / "server.log").read_text()[-3000:])
    assert counts == {"5xx": 0, "hangs": 0, "wrong": 0, "memory_grew": 0}, (counts, detail)
    req = report["requests"]
    # the soak did exercise what it claims: every kind of traffic, cancellations, evictions
    assert req["normal"] > 50 and req["hostile"] > 20 and req["dropped"] > 5 and req["gave_up"] > 5, req
    assert req["admin"] > 10 and req.get("hostile_accepted", 0) == 0, (req, report["examples"])
    metrics = report["server_metrics"]
    assert metrics["lorakit_requests_cancelled_total"] > 5 and metrics["lorakit_adapter_evictions_total"] > 5
    assert report["alive"]

"""The prefill benchmark (autoselect.bench.prefill): every timed pruned call pays for its selection
(apply's memo must not reuse the last one), and the ceiling row is the unpatched model on K image tokens."""

import autoselect
from autoselect.bench import prefill


def test_every_timed_call_runs_the_selection(monkeypatch):
    selector = autoselect.AutoSelector(64, denoiser=None)
    calls = []
    select = selector.select
    monkeypatch.setattr(selector, "select", lambda *a, **k: calls.append(1) or select(*a, **k))
    rows = prefill.run(hidden=64, layers=1, text=8, image=32, repeats=3, keeps=(8, ), methods=("autoselect", ),
                       selector=selector)
    # one call to size the KV cache, one warm-up, three timed: each one scores the image again
    assert len(calls) == 5
    by_provider = {r["provider"]: r for r in rows}
    assert set(by_provider) == {"full", "ceiling", "autoselect"}
    assert "(40 tokens)" in by_provider["full"]["note"]
    assert "(16 tokens)" in by_provider["ceiling"]["note"] and "(16 tokens)" in by_provider["autoselect"]["note"]
    assert all(r["median_ms"] > 0 for r in rows)

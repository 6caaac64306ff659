"""bench/selection.py: replaying saved votes under each selection rule (pure functions over
synthetic candidates; no swarm)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import selection  # noqa: E402


def cand(answer, right, logprobs, greedy=False, winner=False):
    return {"content": f"Answer: {answer}", "calls": [], "logprobs": logprobs,
            "greedy": greedy, "winner": winner, "correct": right}


SURE, UNSURE = [-0.1] * 20, [-0.1] * 10 + [-3.0] * 10     # the unsure one dips: lower mean


def test_the_rules_pick_as_documented():
    # the anchor is wrong and unsure; two confident samples agree on the right answer, two
    # unsure ones agree on another wrong answer
    votes = [cand(1, False, UNSURE, greedy=True), cand(2, True, SURE, winner=True),
             cand(2, True, SURE), cand(3, False, UNSURE), cand(3, False, UNSURE)]
    picks = {name: rule(votes) for name, rule in selection.RULES.items()}
    assert picks["anchor"] == 0 and picks["swarm"] == 1
    assert votes[picks["majority"]]["content"] == "Answer: 2"   # a 2-2 tie: the surer group
    assert picks["mean"] in (1, 2) and picks["window"] in (1, 2)
    assert votes[picks["deepconf"]]["content"] == "Answer: 2"   # the unsure half filtered out
    assert picks["sure3"] == 0                                    # no 3 agree: the anchor


def test_window_is_the_lowest_run_mean():
    assert selection.window_logprob({"logprobs": [-1.0, -2.0]}) == -1.5
    xs = [0.0] * 16 + [-1.0] * 16 + [0.0] * 16
    assert selection.window_logprob({"logprobs": xs}) == -1.0
    assert selection.window_logprob({"logprobs": []}) == float("-inf")


def test_replay_reports_each_rule_against_the_anchor(tmp_path, capsys):
    right_anchor = [cand(1, True, SURE, greedy=True), cand(2, False, UNSURE, winner=True),
                    cand(2, False, UNSURE), cand(1, True, SURE), cand(4, False, UNSURE)]
    wrong_anchor = [cand(1, False, UNSURE, greedy=True, winner=True), cand(2, True, SURE),
                    cand(2, True, SURE), cand(2, True, SURE), cand(3, False, UNSURE)]
    results = {"arms": {"vote5a": {"tasks": [{"id": "a", "candidates": right_anchor},
                                             {"id": "b", "candidates": wrong_anchor},
                                             {"id": "c", "candidates": None}]}}}
    rows = selection.replay(results["arms"]["vote5a"]["tasks"])
    assert rows["anchor"] == [True, False] and rows["swarm"] == [False, False]
    assert rows["majority"] == [True, True] and rows["oracle"] == [True, True]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    assert selection.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "vote5a: 2 voted tasks" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("majority"))
    assert line.split()[1:] == ["2/2", "100.0%", "+50.0", "1", "0"]

"""Voting: answer keys, strategy choice, similarity, tally with its tie rule, and the early-stop and
adaptive-sampling rules, as tables over pure functions (no workers, no clock)."""
from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest

import local_swarm as ls


def cand(text="", finish="stop", latency=1.0, calls=(), worker="worker-0", tokens=10,
         greedy=False, repeat=False):
    return ls.Candidate(worker=worker, text=text, finish_reason=finish, latency=latency,
                        tokens=tokens, calls=tuple(calls), greedy=greedy, repeat=repeat)


def long_text(seed: int, words: int = 1500) -> str:
    """About 2,000 tokens of pseudo-prose (deterministic)."""
    rng = random.Random(seed)
    vocab = [f"word{i}" for i in range(400)] + [",", ".", "(", ")"]
    return " ".join(rng.choice(vocab) for _ in range(words))


# -- answer keys ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,key", [
    # final numbers, in the forms models write them
    ("42", "42"),
    ("so the answer is 42.", "42"),
    ("The answer is: 42", "42"),
    ("Let me think.\nStep 1: 6 * 7.\n#### 42", "42"),
    ("x = 42", "42"),
    (r"Therefore $\boxed{42}$.", "42"),
    (r"\boxed{42} is what we get, I think.", "42"),         # \boxed need not end the text
    (r"First \boxed{7}, then corrected: \boxed{42}", "42"),  # the last box wins
    ("She has 42 apples.", "42"),
    ("The final answer is **42**.", "42"),
    ("+42", "42"),
    ("42.0", "42"),
    ("42.50", "42.5"),
    ("0042", "42"),
    ("1,000", "1000"),
    ("It costs $1,234.50.", "1234.5"),
    ("-3", "-3"),
    ("x = -0.0", "0"),
    ("\u22127", "-7"),                                       # the Unicode minus sign
    ("Growth was 15%.", "15"),
    ("x = 2/4", "2/4"),
    ("x = 0.50/2.0", "0.5/2"),
    # not a final number: glued to a word, a date, a time, a version
    ("2024-01-05", "2024 01 05"),
    ("It is 10:30", "it is 10 30"),
    ("x-5", "x 5"),
    ("Use v1.2", "use v1 2"),
    (r"\boxed{x+1}", "boxed x 1"),
    # code blocks: the last block, whitespace collapsed, the info string ignored
    ("```python\nprint(42)\n```", "code:print(42)"),
    ("Try:\n```\n  a =  1\n\n  b = 2\n```\nthen run it.", "code:a = 1 b = 2"),
    ("```\nold()\n```\nBetter:\n~~~js\nnew()\n~~~\n", "code:new()"),
    ("cut off:\n```py\ndef f():\n    return 1", "code:def f(): return 1"),   # open at the end
    ("```\nx = 1\n```\nThat prints 1.", "1"),   # a final number still comes first
    # folded text: case, punctuation and whitespace
    ("Paris", "paris"),
    ("  PARIS!  ", "paris"),
    ("Hello,   World...\n", "hello world"),
    ("It's  Paris.", "it s paris"),
    ("", ""),
])
def test_answer_key(text, key):
    assert ls.answer_key(text) == key


@pytest.mark.parametrize("a,b", [
    ("The answer is 42.", "#### 42"),
    ("42 apples", r"$\boxed{42.0}$"),
    ("Paris.", "paris"),
    ("```python\ndef f(x):\n    return x\n```", "Here:\n```\ndef f(x):   return x\n```"),
])
def test_answer_key_groups_equivalent_answers(a, b):
    assert ls.answer_key(a) == ls.answer_key(b)


@pytest.mark.parametrize("a,b", [
    ("42", "43"),
    ("42", "-42"),
    ("4.2", "42"),
    ("Paris", "London"),
    ("```\nx = 1\n```", "```\nx = 2\n```"),
])
def test_answer_key_separates_different_answers(a, b):
    assert ls.answer_key(a) != ls.answer_key(b)


@pytest.mark.parametrize("calls,key", [
    (('{"name":"f","arguments":{}}',), 'calls:{"name":"f","arguments":{}}'),
    (("b()", "a()"), "calls:a()\nb()"),      # sorted: the same calls in any order vote together
])
def test_candidate_key_for_calls(calls, key):
    assert ls.candidate_key(cand("some prose", calls=calls)) == key


@pytest.mark.parametrize("text,value", [
    ("15 * 240 / 100", "36"),
    ("15 / 100 * 240", "36"),
    ("15 * (240 / 100)", "36"),
    ("0.15 * 240", "36"),
    ("15 / 240 * 100", "6.25"),
    ("15 / 240", "0.0625"),
    ("1 / 3", "1/3"),                  # no finite decimal: a fraction
    ("-0.5 * 0.5", "-0.25"),
    ("0.1 + 0.2", "0.3"),              # exact, not binary floating point
    ("(2)", "2"),
    ("3 -5+ 1", "-1"),
    # not arithmetic, or not surely so
    ("17520", None),                   # a bare number stays as written ("1.10" is a version)
    ("1.10", None),
    ("2024-01-05", None),              # a date: only minus signs
    ("10 - 3", None),
    ("01 + 2", None),                  # leading zeros
    ("1 / 0", None),
    ("2 ** 10", None),                 # powers could be huge
    ("1e5 * 2", None),
    ("x * 2", None),
    ("print(1+1)", None),
    ("(" * 60 + "1" + ")" * 60, None),  # longer than MAX_EXPRESSION_CHARS
    ("", None),
])
def test_expression_value(text, value):
    assert ls.expression_value(text) == value


def call(name, **arguments):
    return ls.ToolCall(name, arguments).canonical()


def test_calls_that_compute_the_same_value_vote_together():
    cands = [cand(calls=[call("calculator", expression="15 / 240 * 100")], greedy=True),
             cand(calls=[call("calculator", expression="15 / 240")]),
             cand(calls=[call("calculator", expression="15 / 100 * 240")]),
             cand(calls=[call("calculator", expression="15 * (240 / 100)")]),
             cand(calls=[call("calculator", expression="36")])]
    vote = ls.tally(cands)
    assert vote.groups[0] == (2, 3, 4)
    assert vote.winner in (2, 3, 4)
    assert vote.confidence == pytest.approx(3 / 5)


@pytest.mark.parametrize("a,b", [
    (call("write_file", path="VERSION", content="1.10"), call("write_file", path="VERSION",
                                                              content="1.1")),
    (call("calendar", date="2024-01-05"), call("calendar", date="2024-02-04")),
    (call("f", x=["1 + 1"]), call("f", x=["3"])),
])
def test_call_keys_keep_different_calls_apart(a, b):
    assert ls.call_key(a) != ls.call_key(b)


def test_call_key_reads_nested_arguments_and_leaves_other_text():
    assert ls.call_key(call("f", x=["1 + 1"], y={"z": "2 * 1"})) == call("f", x=["2"], y={"z": "2"})
    assert ls.call_key(call("f", x="1 + 1", n=2)) == call("f", x="2", n=2)
    assert ls.call_key("a()") == "a()"                      # not JSON: as it is
    plain = call("read_file", path="src/main.py")
    assert ls.call_key(plain) is plain


@pytest.mark.parametrize("text", [
    "calls: a()", "calls:a()", "CALLS:a()", "```\ncalls:a()\n```", "```\ncalls: a()\n```", "",
])
def test_text_key_never_collides_with_calls(text):
    assert not ls.candidate_key(cand(text)).startswith("calls:")
    assert ls.candidate_key(cand(text)) != ls.candidate_key(cand(text, calls=["a()"]))


# -- strategy ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,short", [
    ("42", True),
    ("Paris", True),
    ("The capital of France is Paris.", True),
    (" ".join(["word"] * ls.SHORT_ANSWER_WORDS), True),
    (" ".join(["word"] * (ls.SHORT_ANSWER_WORDS + 1)), False),
    (long_text(1, 300) + " so the answer is 42.", True),      # announced: a short answer
    (long_text(1, 300) + " #### 7", True),
    (long_text(1, 300) + r" \boxed{7} done", True),
    (long_text(1, 300) + " in 1999.", False),                 # a trailing number is no announcement
    ("```\nx = 1\n```", False),                               # code is keyed by its block
    ("Run `ls`.", True),                                      # inline code is not a block
])
def test_is_short(text, short):
    assert ls.is_short(text) is short


LONG_A, LONG_B = long_text(2, 100), long_text(3, 100)


@pytest.mark.parametrize("texts,calls,strategy", [
    (["42"], [()], "single"),
    ([LONG_A], [()], "single"),
    (["42", "41"], [(), ()], "majority"),
    (["42", "41", LONG_A], [(), (), ()], "majority"),          # most are short
    (["42", LONG_A], [(), ()], "central"),                     # half is not more than half
    ([LONG_A, LONG_B, "42"], [(), (), ()], "central"),
    ([LONG_A, LONG_B], [(), ()], "central"),
    ([LONG_A, LONG_B], [("f()",), ()], "majority"),            # tool calls vote exactly
    (["```\nx\n```", "```\ny\n```"], [(), ()], "majority"),    # code votes by its exact block
    (["```\nx\n```", LONG_A, LONG_B], [(), (), ()], "central"),  # unless most is prose
])
def test_choose_strategy(texts, calls, strategy):
    assert ls.choose_strategy([cand(t, calls=c) for t, c in zip(texts, calls)]) == strategy


def test_code_votes_by_its_exact_block_and_the_anchor_wins_when_no_two_agree():
    f = "Here:\n```python\ndef f(x):\n    return x + {}\n```"
    spaced = "Also:\n```python\ndef f(x):\n        return x + 2\n```\n"   # same block, other prose
    anchor = cand(f.format(1), greedy=True)
    agreed = ls.tally([anchor, cand(f.format(2)), cand(spaced), cand(f.format(3))])
    assert agreed.strategy == "majority" and agreed.winner == 1 and agreed.confidence == 0.5
    apart = ls.tally([cand(f.format(2)), anchor, cand(f.format(3))])
    assert apart.strategy == "majority" and apart.winner == 1          # all differ: the anchor


def test_token_confidence_is_the_least_sure_stretch_as_a_probability():
    sure, unsure = [-0.01] * 20, [-2.0] * 4
    assert ls.token_confidence([]) is None
    assert ls.token_confidence([-0.5, -1.5]) == pytest.approx(math.exp(-1.0))     # all, when few
    low = ls.token_confidence(sure + unsure + sure)        # the 16 tokens holding the 4 unsure ones
    assert low == pytest.approx(math.exp((12 * -0.01 + 4 * -2.0) / 16))
    assert ls.token_confidence(sure + sure) > low and 0 < low < 1


# -- similarity -------------------------------------------------------------------------------------

SIM_TEXTS = ["", "Paris", "the cat sat on the mat", "def f(x):\n    return x + 1\n", LONG_A]


@pytest.mark.parametrize("text", SIM_TEXTS)
def test_similarity_identity_is_one(text):
    assert ls.similarity(text, text) == 1.0


@pytest.mark.parametrize("a,b", list(itertools.combinations(SIM_TEXTS, 2)))
def test_similarity_is_symmetric_and_in_range(a, b):
    assert ls.similarity(a, b) == ls.similarity(b, a)
    assert 0.0 <= ls.similarity(a, b) < 1.0


@pytest.mark.parametrize("a,b,lo,hi", [
    ("the cat sat", "dogs run far", 0.0, 0.0),                                  # disjoint
    ("", "something", 0.0, 0.0),
    ("Paris", "Paris.", 0.5, 0.5),                                               # 1 of 2 unigrams
    ("the cat sat on the mat", "the cat sat on the mat today", 0.75, 0.95),     # near duplicate
    ("The Cat sat", "the cat sat", 1.0, 1.0),                                    # case-folded
    ("a b c d e f", "f e d c b a", 0.4, 0.6),          # same words, no shared order: unigrams only
    ("x = a - b", "x = b - a", 0.3, 0.8),              # order matters in code
])
def test_similarity_values(a, b, lo, hi):
    assert lo <= ls.similarity(a, b) <= hi


def test_similarity_of_two_thousand_token_texts():
    a = long_text(4)
    edited = a.replace("word1 ", "word2 ")                  # a light edit: still very similar
    assert len(ls.TOKEN_RE.findall(a)) >= 1500
    assert 0.9 < ls.similarity(a, edited) < 1.0
    assert ls.similarity(a, long_text(5)) < ls.similarity(a, edited)


def test_mean_similarities_include_self():
    texts = ["a b c", "a b c", "x y z"]
    assert ls.mean_similarities(texts) == [2 / 3, 2 / 3, 1 / 3]
    assert ls.mean_similarities(["same", "same"]) == [1.0, 1.0]


# -- tally ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("texts,winner_key,confidence", [
    (["42", "The answer is 42.", "41"], "42", 2 / 3),
    (["41", "#### 42", "x = 42", "42 apples", "40"], "42", 3 / 5),
    (["Paris", "paris!", "London", "Rome"], "paris", 1 / 2),
    (["7", "7", "7"], "7", 1.0),
])
def test_tally_majority(texts, winner_key, confidence):
    vote = ls.tally([cand(t) for t in texts])
    assert vote.strategy == "majority"
    assert vote.keys == tuple(ls.answer_key(t) for t in texts)
    assert vote.keys[vote.winner] == winner_key
    assert vote.confidence == pytest.approx(confidence)
    assert vote.scores[vote.winner] == vote.confidence


def test_tally_majority_groups_biggest_first():
    vote = ls.tally([cand(t) for t in ["1", "2", "2", "3", "2", "3"]])
    assert vote.groups == ((1, 2, 4), (3, 5), (0,))
    assert vote.scores == (1 / 6, 3 / 6, 3 / 6, 2 / 6, 3 / 6, 2 / 6)
    assert vote.winner in vote.groups[0]


def test_tally_majority_by_tool_calls():
    cands = [cand("I will call f", calls=["b()", "a()"]), cand("calling", calls=["a()", "b()"]),
             cand("no tools needed", latency=0.1)]
    vote = ls.tally(cands)
    assert vote.strategy == "majority"
    assert vote.winner in (0, 1)
    assert vote.groups[0] == (0, 1)
    assert vote.confidence == pytest.approx(2 / 3)


def test_tally_central_picks_the_medoid():
    base = long_text(6, 400)
    texts = [long_text(7, 400),                        # an outlier
             base.replace("word3 ", "word9 "),
             base,                                     # the others are edits of this one
             base.replace("word5 ", "word8 "),
             base + " and one more sentence at the end ."]
    vote = ls.tally([cand(t) for t in texts])
    assert vote.strategy == "central"
    assert vote.winner == 2
    assert (vote.groups, vote.keys) == ((), ())
    assert max(vote.scores) == vote.scores[2] == vote.confidence
    assert vote.scores[0] == min(vote.scores)


def test_tally_central_confidence_is_mean_similarity_with_self():
    texts = [LONG_A, LONG_B, LONG_A + " extra words"]
    vote = ls.tally([cand(t) for t in texts], strategy="central")
    expected = [(1 + sum(ls.similarity(t, u) for u in texts if u is not t)) / 3 for t in texts]
    assert vote.scores == pytest.approx(tuple(expected))
    assert vote.confidence == pytest.approx(max(expected))
    assert 0.0 < vote.confidence < 1.0


def test_tally_central_identical_texts_confidence_one():
    vote = ls.tally([cand(LONG_A), cand(LONG_A), cand(LONG_A)], strategy="central")
    assert vote.confidence == 1.0


# One row per level of the tie rule: every earlier level ties, the level named decides, and the
# losing candidates are better on every later level (so a wrong order of levels fails).
TIE_CASES = {
    # the singleton shares words with both members of the pair, which share only "42": it is the
    # more central, yet the bigger group wins
    "larger group": ("majority", [
        cand("alpha beta gamma delta 7", latency=0.1), cand("alpha beta 42", finish="length",
        latency=5), cand("gamma delta 42", latency=9)], 2),
    # two candidates call again what the conversation just answered: the lone answer wins
    "a reply that moves on before a repeat": ("majority", [
        cand(calls=["f()"], repeat=True, greedy=True, latency=0.1),
        cand(calls=["f()"], repeat=True, latency=0.2), cand("42", finish="length", latency=9)], 2),
    "larger group beats the greedy anchor": ("majority", [
        cand("1", greedy=True, latency=0.1), cand("2", latency=5), cand("2", latency=9)], 1),
    # all three differ: the greedy one wins though it is the least central, cut off and slowest
    "greedy anchor (majority)": ("majority", [
        cand("red apple tart", latency=0.1), cand("red apple pie", latency=0.2),
        cand("apple pie recipe", finish="length", latency=5, greedy=True)], 2),
    "the anchor does not override centrality (central)": ("central", [
        cand("red apple tart", latency=0.1, greedy=True),
        cand("red apple pie", finish="length", latency=5), cand("apple pie recipe", latency=0.2)],
        1),
    "mean similarity (majority)": ("majority", [
        cand("red apple tart", latency=0.1), cand("red apple pie", finish="length", latency=5),
        cand("apple pie recipe", latency=0.2)], 1),
    "mean similarity (central)": ("central", [
        cand("red apple tart", latency=0.1), cand("red apple pie", finish="length", latency=5),
        cand("apple pie recipe", latency=0.2)], 1),
    "stop before length (majority)": ("majority", [
        cand("42", finish="length", latency=0.1), cand("42", finish="stop", latency=5)], 1),
    "stop before length (central)": ("central", [
        cand(LONG_A, finish="length", latency=0.1), cand(LONG_A, finish="stop", latency=5)], 1),
    "tool_calls is complete too": ("majority", [
        cand(calls=["f()"], finish="length", latency=0.1),
        cand(calls=["f()"], finish="tool_calls", latency=5)], 1),
    "lower latency (majority)": ("majority", [
        cand("42", latency=3.0), cand("42", latency=1.0), cand("42", latency=2.0)], 1),
    "lower latency (central)": ("central", [
        cand(LONG_A, latency=3.0), cand(LONG_A, latency=1.0), cand(LONG_A, latency=2.0)], 1),
    "lower index (majority)": ("majority", [cand("42"), cand("42"), cand("42")], 0),
    "lower index (central)": ("central", [cand(LONG_A), cand(LONG_A)], 0),
    "group size only ties at equal size": ("majority", [
        cand("2", latency=9), cand("1", latency=0.1), cand("2", latency=9), cand("1", latency=0.2)],
        1),
}


@pytest.mark.parametrize("strategy,cands,winner", TIE_CASES.values(), ids=TIE_CASES.keys())
def test_tie_rule(strategy, cands, winner):
    assert ls.tally(cands, strategy=strategy).winner == winner


def test_larger_group_beats_a_more_central_singleton():
    texts = [c.text for c in TIE_CASES["larger group"][1]]
    means = ls.mean_similarities(texts)
    assert means[0] > means[1] == means[2]


def test_mean_similarities_equal_but_for_float_rounding_tie():
    # 1 and 3 are mirror images (same words, one order swapped), so their mean similarities are
    # equal, but summed in another order they differ in the last bit: latency must decide
    texts = ["c c", "d c e", "d c c e", "d e c"]
    means = ls.mean_similarities(texts)
    assert means[1] != means[3] and means[1] == pytest.approx(means[3], abs=1e-12)
    cands = [cand(t, latency=latency) for t, latency in zip(texts, [0.1, 2.0, 0.1, 1.0])]
    assert ls.tally(cands, strategy="central").winner == 3


def test_tally_single_candidate():
    for strategy in (None, "majority", "central", "single"):
        vote = ls.tally([cand("anything at all", finish="length")], strategy=strategy)
        assert (vote.strategy, vote.winner, vote.confidence) == ("single", 0, 1.0)
        assert vote.groups == ((0,),) and vote.keys == ("anything at all",)


@pytest.mark.parametrize("call", [
    lambda: ls.tally([]),
    lambda: ls.tally([], strategy="majority"),
    lambda: ls.choose_strategy([]),
    lambda: ls.tally([cand("a"), cand("b")], strategy="single"),
    lambda: ls.tally([cand("a"), cand("b")], strategy="plurality"),
])
def test_tally_errors(call):
    with pytest.raises(ValueError):
        call()


def test_records_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        cand("x").text = "y"
    with pytest.raises(dataclasses.FrozenInstanceError):
        ls.tally([cand("x")]).winner = 1


# -- stopping ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys,remaining,done", [
    ([], 0, False),
    ([], 3, False),
    (["a"], 0, True),
    (["a"], 1, False),                 # a newcomer could tie
    (["a", "a"], 1, True),             # an outsider reaches at most 1
    (["a", "a"], 2, False),
    (["a", "b"], 0, False),            # a tie: tally's tie rule settles it, not the count
    (["a", "b"], 1, False),
    (["a", "a", "b"], 0, True),
    (["a", "a", "b"], 1, False),       # b could tie
    (["a", "a", "b"], 2, False),       # b could reach 3
    (["a", "a", "a", "b"], 1, True),
    (["a", "a", "a", "b", "c"], 1, True),
    (["a", "a", "a", "b", "b"], 0, True),
    (["a", "a", "a", "b", "b"], 1, False),
    (["a", "a", "a"], 2, True),
    (["a", "a", "a"], 3, False),
])
def test_decided(keys, remaining, done):
    assert ls.decided(keys, remaining) is done


def test_decided_rejects_negative_remaining():
    with pytest.raises(ValueError):
        ls.decided(["a"], -1)


@pytest.mark.parametrize("keys,probability", [
    ([], 0.5),
    (["a"], 0.75),                      # Beta(2, 1)
    (["a", "a", "a", "a"], 31 / 32),    # Beta(5, 1)
    (["a", "b"], 0.5),
    (["a", "a", "b"], 11 / 16),         # Beta(3, 2)
    (["a", "a", "a", "b"], 26 / 32),    # Beta(4, 2)
    (["a", "a", "a", "b", "c"], 26 / 32),   # only the top two counts matter
])
def test_leader_probability(keys, probability):
    assert ls.leader_probability(keys) == pytest.approx(probability)


@pytest.mark.parametrize("keys,budget,more", [
    ([], 16, 4),                              # four in a row would reach 31/32 >= 0.95
    (["a"], 16, 3),
    (["a", "a", "a"], 16, 1),
    (["a"] * 4, 16, 0),                       # unanimous early samples: stop
    (["a"] * 4 + ["b"], 16, 2),              # Beta(7, 2) gives 0.965
    (["a", "b"], 16, 5),                      # split: ask for more
    (["a", "b", "c", "d"], 16, 5),
    (["a", "a", "b", "b", "c", "c"], 16, 6),
    (["a", "b"], 5, 3),                       # 5 would be needed; only 3 are left
    (["a", "b"], 2, 0),                       # budget spent
    (["a", "b", "c"], 2, 0),                  # over budget already
    ([], 0, 0),
])
def test_adaptive_more(keys, budget, more):
    assert ls.adaptive_more(keys, budget) == more


@pytest.mark.parametrize("threshold,more", [(0.6, 0), (0.75, 0), (0.9, 2), (0.99, 5)])
def test_adaptive_more_threshold(threshold, more):
    assert ls.adaptive_more(["a"], 32, threshold) == more


def test_adaptive_more_bounds_hold_for_all_small_cases():
    for n, budget in itertools.product(range(7), range(9)):
        for keys in itertools.product("abc", repeat=n):
            more = ls.adaptive_more(keys, budget)
            room = max(0, budget - n)
            assert 0 <= more <= room
            leader = max(keys, key=keys.count) if keys else "a"
            if more < room:     # asked for fewer than allowed: those few, agreeing, would stop it
                done = ls.leader_probability(list(keys) + [leader] * more)
                assert done >= ls.ADAPTIVE_THRESHOLD


@pytest.mark.parametrize("threshold", [0.5, 0.3, 1.0, 1.5])
def test_adaptive_more_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError):
        ls.adaptive_more(["a"], 8, threshold)


def test_an_empty_reply_never_wins_over_an_answer():
    vote = ls.tally([cand(""), cand(" "), cand("The answer is 4.")], "majority")
    assert vote.winner == 2


@pytest.mark.parametrize("cands,stuck", [
    ([cand(calls=["f()"], repeat=True), cand(calls=["f()"], repeat=True), cand("42")], True),
    ([cand(calls=["f()"], repeat=True), cand("42"), cand("43")], False),   # text leads (one key)
    ([cand(calls=["f()"]), cand(calls=["f()"]), cand(calls=["f()"], repeat=True)], False),
    ([], False),
])
def test_leader_repeats(cands, stuck):
    assert ls.leader_repeats(cands) is stuck


@pytest.mark.parametrize("candidate,sure", [
    (cand("42", greedy=True), True),
    (cand(calls=["f()"], greedy=True), True),
    (cand(calls=["f()"], greedy=True, repeat=True), False),   # a sure repeat is still a repeat
    (cand("  ", greedy=True), False),                           # nothing said
    (cand("42"), False),                                        # a sample is no anchor
])
def test_a_sure_anchor_moves_the_conversation_on(candidate, sure):
    gen = ls.Generation(logprobs=[-0.001] * 20)
    assert ls.sure_anchor(candidate, gen) is sure
    assert candidate.idle is (candidate.repeat or not candidate.text.strip() and not candidate.calls)

"""Federation: beacons and their signatures (tables), the trust rules (stale, replayed), the peer
table, discovery over real UDP sockets on loopback, the federation listener's authentication, the
federated vote over in-process swarms of fake workers (with slow, dead and lying peers), and real
daemons: two on loopback with static peers (always), and three plus a stranger in network
namespaces joined by a bridge (where namespaces can be made). No packet leaves the machine: every
socket here is on 127.0.0.1 or inside a namespace this file creates."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import namedtuple
from dataclasses import dataclass, field, replace
from datetime import datetime

import httpx
import psutil
import pytest

import local_swarm as ls
from conftest import READY_LINE, ROOT, WAIT_TIMEOUT, until, wait_for
from test_chat import voters
from test_workers import started_pool

SECRET = "correct horse battery staple"
OTHER = "another secret entirely"
MODEL = "fake-model"


def run(coro, timeout=2 * WAIT_TIMEOUT):
    """Run one async test body; its time limit leaves room for an `until` to fail first."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Clock:
    """A clock that moves only when a test says so. Nodes that share one agree on the time, so
    their signed messages stay fresh however far it is moved."""

    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def beacon(**over):
    fields = dict(node=uuid.uuid4().hex, name="alpha", port=8765, model=MODEL, instances=2,
                  load=0.5, interval=5.0, ts=time.time(), nonce=os.urandom(16).hex())
    return ls.Beacon(**{**fields, **over})


def signed_payload(obj, secret=SECRET):
    payload = json.dumps(obj).encode()
    return payload + b"\n" + ls.Trust(secret).sign("beacon", payload).encode()


# -- beacons: encode, decode, signatures -----------------------------------------------------------

GOOD = beacon()
GOOD_BYTES = ls.encode_beacon(GOOD, ls.Trust(SECRET))
GOOD_OBJ = json.loads(GOOD_BYTES.rpartition(b"\n")[0])


def _tampered():
    return GOOD_BYTES.replace(b'"instances":2', b'"instances":9')


@pytest.mark.parametrize("data,error", [
    (_tampered(), "bad signature"),
    (ls.encode_beacon(GOOD, ls.Trust(OTHER)), "bad signature"),
    (GOOD_BYTES.rpartition(b"\n")[0], "not a signed beacon"),
    (GOOD_BYTES.rpartition(b"\n")[0] + b"\n", "bad signature"),
    (b"\x00\xff" * 40 + b"\n" + b"zz" * 32, "bad signature"),
    (b"", "not a signed beacon"),
    (GOOD_BYTES + b" " * ls.MAX_BEACON_BYTES, "no beacon"),
    (signed_payload({**GOOD_OBJ, "v": 2}), "version 2"),
    (signed_payload({**GOOD_OBJ, "v": True}), "'v'"),
    (signed_payload({k: v for k, v in GOOD_OBJ.items() if k != "name"}), "'name'"),
    (signed_payload({**GOOD_OBJ, "name": "bad name\n"}), "'name'"),
    (signed_payload({**GOOD_OBJ, "port": True}), "'port'"),
    (signed_payload({**GOOD_OBJ, "port": 70000}), "'port'"),
    (signed_payload({**GOOD_OBJ, "node": "../etc"}), "'node'"),
    (signed_payload({**GOOD_OBJ, "load": float("nan")}), "'load'"),
    (signed_payload({**GOOD_OBJ, "interval": 0}), "'interval'"),
    (signed_payload([1, 2, 3]), "not a JSON object"),
    (b"{not json" + b"\n" + ls.Trust(SECRET).sign("beacon", b"{not json").encode(), "not JSON"),
], ids=["tampered", "wrong-secret", "unsigned", "empty-signature", "garbage", "empty",
        "oversize", "version-2", "version-bool", "no-name", "bad-name", "port-bool", "port-range",
        "bad-node", "load-nan", "interval-zero", "not-object", "not-json"])
def test_a_beacon_is_refused_unless_signed_whole_and_well_formed(data, error):
    with pytest.raises(ls.PeerError, match=error):
        ls.decode_beacon(data, ls.Trust(SECRET))


def test_a_beacon_decodes_to_what_was_encoded():
    assert ls.decode_beacon(GOOD_BYTES, ls.Trust(SECRET)) == GOOD
    assert len(GOOD_BYTES) < ls.MAX_BEACON_BYTES // 2
    assert GOOD_OBJ["v"] == ls.FEDERATION_VERSION


def test_signatures_separate_their_parts():
    trust = ls.Trust(SECRET)
    with pytest.raises(ValueError):
        trust.sign("a\nb", "c")                 # a newline may only be in the last part
    assert trust.sign("GET", "/x", "1", "n", b"") != trust.sign("GET", "/x1", "", "n", b"")
    assert trust.sign("beacon", b"x") != ls.Trust(OTHER).sign("beacon", b"x")
    with pytest.raises(ls.PeerError, match="bad signature"):
        trust.verify(None, "beacon", b"x")
    with pytest.raises(ls.PeerError, match="bad signature"):
        trust.verify("\u00e9" * 64, "beacon", b"x")     # not even ASCII: refused, no TypeError


# -- trust: stale and replayed messages ------------------------------------------------------------

def test_stale_future_and_replayed_messages_are_refused():
    clock = Clock()
    trust = ls.Trust(SECRET, clock)
    nonce = os.urandom(16).hex()
    trust.admit(clock.now - 29, nonce)
    with pytest.raises(ls.PeerError, match="replayed"):
        trust.admit(clock.now - 29, nonce)
    for ts in (clock.now - 31, clock.now + 31, float("nan"), float("inf"), "soon", None):
        with pytest.raises(ls.PeerError, match="stale|timestamp"):
            trust.admit(ts, os.urandom(16).hex())
    for bad in ("", "xyz", "A" * 32, 12):
        with pytest.raises(ls.PeerError, match="nonce"):
            trust.admit(clock.now, bad)


def test_nonces_are_forgotten_once_stale_and_never_beyond_capacity():
    clock = Clock()
    trust = ls.Trust(SECRET, clock, capacity=3)
    nonces = [os.urandom(16).hex() for _ in range(5)]
    for n in nonces[:3]:
        trust.admit(clock.now, n)
    trust.admit(clock.now, nonces[3])            # over capacity: the oldest goes
    assert not trust.seen(nonces[0]) and trust.seen(nonces[3])
    clock.now += ls.MAX_CLOCK_SKEW + 1
    trust.admit(clock.now, nonces[4])
    assert [trust.seen(n) for n in nonces] == [False, False, False, False, True]
    with pytest.raises(ls.PeerError, match="stale"):
        trust.admit(clock.now - ls.MAX_CLOCK_SKEW - 1, nonces[1])   # forgotten, but stale


# -- peer table ------------------------------------------------------------------------------------

def peer(node=None, name="beta", host="127.0.0.1", port=9000, model=MODEL, **over):
    fields = dict(node=node or uuid.uuid4().hex, name=name, host=host, port=port, model=model,
                  instances=1, load=0.0, interval=1.0, last_seen=time.time())
    return ls.Peer(**{**fields, **over})


def test_peer_table_ignores_its_own_node_and_expires_the_silent():
    clock = Clock()
    own = uuid.uuid4().hex
    table = ls.PeerTable(own, clock)
    assert not table.update(peer(own, last_seen=clock.now))
    a = peer(name="a", port=1, last_seen=clock.now)
    b = peer(name="b", port=2, last_seen=clock.now, interval=2.0)
    assert table.update(a) and table.update(b) and not table.update(a)
    clock.now += 3.4
    assert {p.name for p in table.live()} == {"a", "b"}
    clock.now += 0.2                            # 3.6 s: a (1 s beacons) missed three and a half
    assert [p.name for p in table.live()] == ["b"]
    assert [p.name for p in table.expire()] == ["a"]
    clock.now += 3.5
    assert [p.name for p in table.expire()] == ["b"] and table.live() == []


def test_peer_table_keeps_static_peers_static_and_refuses_a_flood():
    clock = Clock()
    table = ls.PeerTable("own", clock, capacity=2)
    node = uuid.uuid4().hex
    table.update(peer(node, static=True, last_seen=clock.now))
    table.update(peer(node, static=False, last_seen=clock.now))
    assert table.live()[0].static
    assert table.update(peer(port=1, last_seen=clock.now))
    assert not table.update(peer(port=2, last_seen=clock.now))  # full of live peers
    clock.now += 10
    assert table.update(peer(port=3, last_seen=clock.now))      # the silent made room


def test_a_swarm_restarted_at_the_same_address_replaces_its_old_node():
    table = ls.PeerTable("own")
    old, new = peer(port=9000), peer(port=9000)
    table.update(old)
    table.update(peer(port=9001))
    assert table.update(new)
    assert sorted((p.port, p.node == new.node) for p in table.live()) == [(9000, True),
                                                                          (9001, False)]


# -- interfaces and addresses ----------------------------------------------------------------------

Addr = namedtuple("Addr", "family address netmask broadcast ptp")
Stat = namedtuple("Stat", "isup")


def _v4(address, broadcast):
    return [Addr(socket.AF_INET, address, "255.255.255.0", broadcast, None),
            Addr(socket.AF_INET6, "fe80::1", None, None, None)]


SNAPSHOT = {
    "lo": _v4("127.0.0.1", None), "eth0": _v4("192.168.1.20", "192.168.1.255"),
    "wlan0": _v4("10.0.0.5", "10.0.0.255"), "docker0": _v4("172.17.0.1", "172.17.255.255"),
    "br-1a2b": _v4("172.18.0.1", "172.18.255.255"), "veth9f": _v4("169.254.1.1", "169.254.255.255"),
    "tun0": _v4("10.8.0.2", "10.8.0.255"), "wg0": _v4("10.9.0.2", "10.9.0.255"),
    "eth1": _v4("192.168.7.2", "192.168.7.255"),
}
STATS = {name: Stat(name != "eth1") for name in SNAPSHOT}        # eth1 is down


def test_beacons_go_to_real_lan_interfaces_only():
    assert ls.broadcast_addresses((), SNAPSHOT, STATS) == ["192.168.1.255", "10.0.0.255"]
    assert ls.broadcast_addresses(("tun0", "eth1"), SNAPSHOT, STATS) == ["10.8.0.255"]
    cfg = ls.Config(broadcast=("127.0.0.1", "127.0.0.1:9"))
    assert ls.beacon_targets(cfg, 8765) == [("127.0.0.1", 8765), ("127.0.0.1", 9)]


@pytest.mark.parametrize("text,parsed", [
    ("10.0.0.2:9000", ("10.0.0.2", 9000)), ("host.lan", ("host.lan", 8765)),
    ("[fe80::1]:9000", ("fe80::1", 9000)), ("[::1]", ("::1", 8765)), (" a:1 ", ("a", 1)),
    ("a:0", None), ("a:65536", None), ("a:x", None), (":80", None), ("", None), ("[::1", None),
    ("[::1]x", None), ("a b:1", None), ("http://a:1", None), ("fe80::1", ("fe80::1", 8765)),
])
def test_peer_addresses(text, parsed):
    if parsed is None:
        with pytest.raises(ValueError):
            ls.parse_peer_address(text, 8765)
    else:
        assert ls.parse_peer_address(text, 8765) == parsed


def test_federation_flags_become_config_and_bad_ones_exit_2():
    args = ls.build_parser().parse_args([
        "--secret", "s3", "--peer", "10.0.0.2:9000", "--peer", "b", "--beacon-interval", "1",
        "--federation-broadcast", "127.0.0.1", "--federation-interface", "eth0",
        "--federation-port", "9100", "--federation-any-model", "--node-name", "my laptop"])
    cfg = ls.config_from_args(args)
    assert (cfg.secret, cfg.peers, cfg.beacon_interval, cfg.broadcast, cfg.interfaces) == (
        "s3", ("10.0.0.2:9000", "b"), 1.0, ("127.0.0.1",), ("eth0",))
    assert cfg.federation_port == 9100 and cfg.any_model and cfg.node_name == "my-laptop"
    assert "s3" not in repr(cfg)
    for bad in (["--peer", "a:x"], ["--beacon-interval", "0"], ["--federation-port", "-1"],
                ["--federation-timeout", "0"], ["--federation-broadcast", "[::1"]):
        with pytest.raises(SystemExit) as info:
            ls.config_from_args(ls.build_parser().parse_args(bad))
        assert info.value.code == 2


# -- weighted votes, request bodies, vote replies --------------------------------------------------

def cand(text, worker="worker-1", weight=1.0, latency=1.0):
    return ls.Candidate(worker=worker, text=text, finish_reason="stop", latency=latency,
                        tokens=3, weight=weight)


def test_a_peer_answer_counts_as_the_candidates_that_agreed_on_it():
    local = [cand("Answer: 5", latency=0.1), cand("Answer: 9", "worker-2")]
    vote = ls.tally(local)
    assert vote.winner == 0 and vote.confidence == 0.5          # a tie: the faster wins
    vote = ls.tally([*local, cand("The answer is 9", "peer:b", weight=2.0)])
    assert vote.winner in (1, 2) and vote.confidence == pytest.approx(0.75)
    assert vote.scores[0] == pytest.approx(0.25)
    long = ["a long answer about trees " * 5, "a long answer about stones " * 5]
    plain = ls.tally([cand(long[0]), cand(long[1], "worker-2")], "central")
    weighed = ls.tally([cand(long[0]), cand(long[1], "peer:b", weight=3.0)], "central")
    assert plain.scores[0] == plain.scores[1] and weighed.winner == 1
    assert weighed.scores[1] > weighed.scores[0]


def unweighted_means(texts):
    """mean_similarities as it was before weights (the reference)."""
    sums = [1.0] * len(texts)
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            s = ls.similarity(texts[i], texts[j])
            sums[i] += s
            sums[j] += s
    return [s / len(texts) for s in sums]


def test_unit_weights_vote_exactly_as_before():
    texts = ["x = 1\n```py\nprint(1)\n```", "Answer: 4", "answer 4!", "Long prose " * 30,
             "Answer: 4"]
    cands = [cand(t, f"worker-{i}") for i, t in enumerate(texts)]
    assert ls.mean_similarities(texts) == unweighted_means(texts)
    majority = ls.tally(cands, "majority")
    assert majority.scores == (0.2, 0.6, 0.6, 0.2, 0.6)          # exact: count / k
    assert ls.tally(cands, "central").scores == tuple(unweighted_means(texts))


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_the_request_a_peer_votes_on_is_ours_without_seed_and_never_federated():
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c1", "type": "function", "function": {
                                 "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "rain"}],
            "max_tokens": 32, "seed": 7, "stop": ["\n\n"], "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False, "response_format": {"type": "json_object"}}
    req = ls.parse_chat_request(body)
    sent = ls.peer_request_body(req, 0.7)
    assert "seed" not in sent and sent["temperature"] == 0.7
    assert sent["swarm"] == {"federate": False}
    again = ls.parse_chat_request(json.loads(json.dumps(sent)))
    assert again.messages == req.messages and again.tool_use == req.tool_use
    assert again.response_schema == {} and again.swarm.federate is False
    assert {k: v for k, v in again.sampling.items() if k != "temperature"} == \
        {k: v for k, v in req.sampling.items() if k != "seed"}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    req = ls.parse_chat_request({"messages": body["messages"][:2], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert ls.parse_chat_request(ls.peer_request_body(req, 1.0)).response_schema == schema


NODE = uuid.uuid4().hex
REPLY = {"v": 1, "node": NODE, "name": "b", "model": MODEL, "text": "Answer: 9",
         "response": {"role": "assistant", "content": "Answer: 9"}, "finish_reason": "stop",
         "confidence": 0.75, "worker_count": 4, "strategy": "majority", "latency_ms": 12.5,
         "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


@pytest.mark.parametrize("change,error", [
    ({"node": uuid.uuid4().hex}, "another node"), ({"v": 2}, "version"),
    ({"confidence": 1.5}, "confidence"), ({"confidence": "high"}, "confidence"),
    ({"worker_count": 0}, "worker_count"), ({"worker_count": 10**6}, "worker_count"),
    ({"strategy": "coin"}, "strategy"), ({"finish_reason": "maybe"}, "finish_reason"),
    ({"text": None}, "text"), ({"usage": {"prompt_tokens": -1}}, "prompt_tokens"),
    ({"usage": None}, "usage"), ({"latency_ms": -3}, "latency_ms"),
])
def test_a_malformed_vote_reply_is_refused(change, error):
    with pytest.raises(ls.PeerError, match=error):
        ls.parse_vote_reply(json.dumps({**REPLY, **change}).encode(), NODE)
    with pytest.raises(ls.PeerError, match="not JSON"):
        ls.parse_vote_reply(b"<html>", NODE)


def test_a_vote_reply_weighs_what_agreed_on_it():
    answer = ls.parse_vote_reply(json.dumps(REPLY).encode(), NODE)
    assert answer.weight == 3.0 and answer.completion_tokens == 3
    lone = ls.parse_vote_reply(json.dumps({**REPLY, "confidence": 0.1}).encode(), NODE)
    assert lone.weight == 1.0                   # an answer is at least one sample


# -- in-process swarms: fake workers, real sockets on loopback -------------------------------------

def free_port():
    """A port free on 127.0.0.1 for both TCP and UDP (the federation uses one number for both)."""
    while True:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@dataclass
class Node:
    """An in-process swarm: fake workers, a chat service, a Federation and its listener."""

    cfg: ls.Config
    pool: ls.WorkerPool
    fed: ls.Federation
    chat: ls.ChatService
    server: ls.HttpServer
    workers: list = field(default_factory=list)

    @property
    def port(self):
        return self.fed.port

    def chats(self):
        return sum(getattr(w, "chats", 0) for w in self.workers)

    async def stop(self):
        await self.fed.stop()
        await self.server.stop()
        await self.pool.stop()


async def node(*answers, name="alpha", secret=SECRET, model=MODEL, interval=0.3,
               broadcast=None, clock=time.time, **cfg) -> Node:
    """A Node whose beacons go only to its own port unless `broadcast` says where; its
    federation reads `clock` (peer ages and expiry, message timestamps)."""
    port = free_port()
    cfg = ls.Config(mode="vote", adaptive=False, secret=secret, node_name=name,
                    federation_host="127.0.0.1", federation_port=port, beacon_interval=interval,
                    broadcast=tuple(broadcast or (f"127.0.0.1:{port}",)), **cfg)
    workers = voters(*answers)
    pool = await started_pool(workers)
    fed = ls.Federation(cfg, model, len(workers), pool.load, clock=clock)
    chat = ls.ChatService(pool, ls.PromptRenderer(None), model, 100, cfg, peers=fed)
    server = ls.HttpServer(ls.FederationApp(fed, chat).handle, cfg.http, "127.0.0.1", port, ())
    await server.start()
    await fed.start(server.port)
    return Node(cfg, pool, fed, chat, server, workers)


def names(n: Node):
    return sorted(p.name for p in n.fed.table.live())


def logged(caplog, text: str, since: int = 0) -> bool:
    """True once a log line captured after the first `since` holds `text`."""
    return any(text in r.getMessage() for r in caplog.records[since:])


def test_beacons_over_udp_find_peers_but_never_self_or_a_stranger(caplog):
    async def go():
        a = await node("x", name="alpha")
        b = await node("x", name="beta", broadcast=[f"127.0.0.1:{a.port}", "127.0.0.1"])
        c = await node("x", name="stranger", secret=OTHER, broadcast=[f"127.0.0.1:{a.port}"])
        try:
            await until(lambda: names(a) == ["beta"])
            await until(lambda: logged(caplog, "refusing beacons"))   # the stranger's was heard
            assert names(a) == ["beta"]          # never itself, never the stranger
            assert names(b) == [] and names(c) == []     # b hears only itself
            found = a.fed.table.live()[0]
            assert (found.host, found.port, found.static) == ("127.0.0.1", b.port, False)
            assert found.node == b.fed.node != a.fed.node
        finally:
            for n in (a, b, c):
                await n.stop()
    with caplog.at_level(logging.WARNING, "local_swarm"):
        run(go())
    refusals = [r.getMessage() for r in caplog.records if "refusing beacons" in r.getMessage()]
    assert len(refusals) == 1 and "bad signature" in refusals[0]    # once, not once per beacon


def test_replayed_and_stale_beacons_over_udp_are_refused():
    """Datagrams from one socket arrive in order, so once "late" (sent last) is listed, every
    datagram before it was taken or refused."""
    async def go():
        clock = Clock(time.time())
        a = await node("x", interval=30, clock=clock)   # no beacon of its own in the way
        trust = ls.Trust(SECRET)

        def echo():
            return next(p for p in a.fed.table.live() if p.name == "echo")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                datagram = ls.encode_beacon(beacon(name="echo"), trust)
                s.sendto(datagram, ("127.0.0.1", a.port))
                await until(lambda: names(a) == ["echo"])
                first = echo().last_seen
                clock.now += 1                   # a beacon taken from now on is seen later
                s.sendto(datagram, ("127.0.0.1", a.port))          # replayed: not heard again
                for ts in (time.time() - 120, time.time() + 120):
                    s.sendto(ls.encode_beacon(beacon(name="stale", ts=ts), trust),
                             ("127.0.0.1", a.port))
                s.sendto(b"\xff" * 5000, ("127.0.0.1", a.port))     # garbage, oversize
                s.sendto(ls.encode_beacon(beacon(name="late", port=8766), trust),
                         ("127.0.0.1", a.port))
                await until(lambda: names(a) == ["echo", "late"])  # the socket lives on
                assert echo().last_seen == first
                s.sendto(ls.encode_beacon(beacon(name="echo", node=echo().node), trust),
                         ("127.0.0.1", a.port))                      # a fresh one is
                await until(lambda: echo().last_seen > first)
        finally:
            await a.stop()
    run(go())


def test_a_peer_that_falls_silent_expires(caplog):
    """On a clock the test moves: b beacons once (at its start; its interval is a minute), then
    stops. a lists it through PEER_EXPIRY_BEACONS of its intervals, not a moment longer, and a's
    next beacon pass sweeps it out of the table."""
    async def go():
        clock = Clock(float(int(time.time())))
        a = await node("x", interval=0.25, clock=clock)
        b = await node("x", name="beta", interval=60, broadcast=[f"127.0.0.1:{a.port}"],
                       clock=clock)
        try:
            await until(lambda: names(a) == ["beta"])
            await b.stop()
            heard = a.fed.table.live()[0].last_seen
            clock.now += 60
            assert names(a) == ["beta"]          # one missed beacon is no reason to drop it
            clock.now = heard + ls.PEER_EXPIRY_BEACONS * 60
            assert names(a) == ["beta"]          # three missed, and half an interval of jitter
            clock.now += 0.01
            assert names(a) == []
            await until(lambda: logged(caplog, "federation: lost beta"))
            assert a.fed.table.expire() == []    # the sweep took it out of the table too
        finally:
            await a.stop()
    with caplog.at_level(logging.INFO, "local_swarm"):
        run(go())


def test_static_peers_are_polled_signed_and_a_wrong_secret_is_never_listed(caplog):
    async def go():
        clock = Clock(time.time())
        b = await node("x", name="beta", interval=30, clock=clock)
        c = await node("x", name="stranger", secret=OTHER, interval=30, clock=clock)
        a = await node("x", name="alpha", interval=0.3, clock=clock,
                       peers=[f"127.0.0.1:{b.port}", f"127.0.0.1:{c.port}", "127.0.0.1:1"])
        try:
            await until(lambda: names(a) == ["beta"])
            listed = a.fed.table.live()[0]
            assert listed.static and listed.node == b.fed.node and listed.port == b.port
            assert a.fed.peers()["data"][0]["source"] == "static"
            clock.now += 3 * 0.3                 # three polls' time: only a poll keeps it listed
            await until(lambda: a.fed.table.live()[0].last_seen == clock.now)
            clock.now += 3 * 0.3
            assert names(a) == ["beta"]
            before = len(caplog.records)
            await b.stop()
            await until(lambda: logged(caplog, f"127.0.0.1:{b.port} does not answer", before))
            clock.now += ls.PEER_EXPIRY_BEACONS * 0.3 + 0.01    # a poll failed: none refreshes it
            assert names(a) == []
        finally:
            for n in (a, c):
                await n.stop()
    with caplog.at_level(logging.WARNING, "local_swarm"):
        run(go())
    warned = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
    assert any("bad signature" in w for w in warned) and any(":1 " in w for w in warned)


# -- the federation listener: authentication -------------------------------------------------------

def signed(trust, method, path, body=b"", ts=None, nonce=None):
    stamp, fresh = trust.stamp()
    ts, nonce = ts or stamp, nonce or fresh
    return {ls.TIMESTAMP_HEADER: ts, ls.NONCE_HEADER: nonce,
            ls.SIGNATURE_HEADER: trust.sign(method, path, ts, nonce, body)}


def test_the_listener_refuses_unsigned_forged_stale_and_replayed_calls():
    async def go():
        b = await node("x", name="beta", interval=30)
        url = f"http://127.0.0.1:{b.port}"
        good, other = ls.Trust(SECRET), ls.Trust(OTHER)
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        try:
            async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
                async def status(headers, path=ls.STATUS_PATH, method="GET", content=b""):
                    return await client.request(method, path, headers=headers, content=content)
                cases = {
                    "unsigned": await status({}),
                    "forged": await status(signed(other, "GET", ls.STATUS_PATH)),
                    "stale": await status(signed(good, "GET", ls.STATUS_PATH,
                                                 ts=f"{time.time() - 90:.3f}")),
                    "wrong-path": await status(signed(good, "GET", ls.PEERS_PATH)),
                    "swapped-body": await status(signed(good, "POST", ls.VOTE_PATH, b"{}"),
                                                 ls.VOTE_PATH, "POST", body),
                    "vote-unsigned": await status({}, ls.VOTE_PATH, "POST", body),
                }
                for what, reply in cases.items():
                    assert reply.status_code == 401, what
                    error = reply.json()["error"]
                    assert error["type"] == "authentication_error", what
                    assert set(error) == {"message", "type", "param", "code"}
                assert "unsigned" in cases["unsigned"].json()["error"]["message"]
                assert "stale" in cases["stale"].json()["error"]["message"]
                assert b.chats() == 0            # nothing reached a worker
                headers = signed(good, "GET", ls.STATUS_PATH)
                first, again = await status(headers), await status(headers)
                assert first.status_code == 200 and again.status_code == 401
                assert "replayed" in again.json()["error"]["message"]
                good.verify(first.headers[ls.SIGNATURE_HEADER], "reply", ls.STATUS_PATH,
                            headers[ls.NONCE_HEADER], "200", first.content)
                assert first.json()["node"] == b.fed.node and first.json()["enabled"]
                nope = await status(signed(good, "GET", "/v1/federation/nothing"),
                                    "/v1/federation/nothing")
                assert nope.status_code == 404 and ls.SIGNATURE_HEADER in nope.headers
                bad = await status(signed(good, "POST", ls.VOTE_PATH, b"[]"), ls.VOTE_PATH,
                                   "POST", b"[]")
                assert bad.status_code == 400 and bad.json()["error"]["type"] == \
                    "invalid_request_error"
        finally:
            await b.stop()
    run(go())


async def answer(app, method, path, body=b"", key="k"):
    """(status, JSON body) of the chat API's answer, errors included."""
    headers = (("x-api-key", key),) if key else ()
    try:
        reply = await app.handle(ls.Request(method, path, path, "HTTP/1.1", headers, body))
    except ls.HTTPError as exc:
        reply = ls.Response.error(exc)
    return reply.status, json.loads(reply.body)


def test_the_chat_api_never_takes_votes_and_says_when_federation_is_off():
    async def go():
        pool = await started_pool(voters("x"))
        cfg = ls.Config(api_key="k")
        chat = ls.ChatService(pool, ls.PromptRenderer(None), MODEL, 100, cfg)
        off = ls.SwarmApp(cfg, pool, chat, MODEL)
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        for method, path in (("GET", ls.STATUS_PATH), ("GET", ls.PEERS_PATH),
                             ("POST", ls.VOTE_PATH)):
            status, reply = await answer(off, method, path, body)
            assert status == 403 and "--secret" in reply["error"]["message"]
            assert reply["error"]["code"] == "federation_disabled"
        n = await node("x", interval=30)
        on = ls.SwarmApp(cfg, pool, chat, MODEL, n.fed)
        status, reply = await answer(on, "POST", ls.VOTE_PATH, body)
        assert status == 404 and str(n.port) in reply["error"]["message"]
        status, reply = await answer(on, "GET", ls.PEERS_PATH, key=None)
        assert status == 401                     # the API key guards these as any route
        status, reply = await answer(on, "GET", ls.STATUS_PATH)
        assert status == 200 and reply["node"] == n.fed.node
        assert getattr(pool.slots[0].worker, "chats", 0) == 0
        await n.stop()
        await pool.stop()
    run(go())


# -- the federated vote ----------------------------------------------------------------------------

def request(**extra):
    return ls.parse_chat_request({"messages": [{"role": "user", "content": "6 + 3?"}], **extra})


def know(a: Node, *others: Node):
    """Put the others in a's table, as a beacon would."""
    for b in others:
        a.fed.table.update(ls.Peer(node=b.fed.node, name=b.fed.name, host="127.0.0.1",
                                   port=b.port, model=b.fed.model_id, instances=len(b.workers),
                                   load=0.0, interval=60.0, last_seen=time.time()))


def test_a_federated_vote_counts_each_peer_as_the_candidates_that_agreed():
    async def go():
        a = await node("Answer: 5", "Answer: 9", interval=60)
        b = await node("The answer is 9.", "Answer: 9", name="beta", interval=60)
        c = await node("Answer: 5", name="gamma", interval=60)
        know(a, b, c)
        know(b, a)                               # b could ask a back: it must not
        try:
            reply, gen, swarm = await a.chat.complete(request(swarm={"votes": 2}))
            assert "9" in reply["choices"][0]["message"]["content"]
            assert swarm["mode"] == "vote" and swarm["strategy"] == "majority"
            peers = {p["name"]: p for p in swarm["peers"]}
            assert {p["status"] for p in peers.values()} == {"voted"}
            assert peers["beta"]["weight"] == 2.0 and peers["gamma"]["weight"] == 1.0
            assert swarm["confidence"] == pytest.approx(3 / 5, abs=1e-3)   # 1 + 2 of 1+1+2+1
            workers = [cand["worker"] for cand in swarm["candidates"]]
            assert sorted(workers) == ["peer:beta", "peer:gamma", "worker-1", "worker-2"]
            assert a.chats() == 2 and b.chats() == 2 and c.chats() == 1   # no vote went around
            sent = b.workers[0].requests[0][1]
            assert sent["messages"][-1]["content"] == "6 + 3?"
        finally:
            for n in (a, b, c):
                await n.stop()
    run(go())


def test_slow_dead_and_lying_peers_are_dropped_and_the_request_still_succeeds(monkeypatch):
    monkeypatch.setattr(ls, "PEER_MIN_WAIT", 0.5)

    async def go():
        a = await node("Answer: 5", "Answer: 5", interval=60)
        good = ls.Trust(SECRET)
        fakes = {
            "liar": (ls.Trust(OTHER), json.dumps({**REPLY}).encode(), 0),
            "garbled": (good, b"{\"v\": 1, \"node\"", 0),
            "slow": (good, json.dumps(REPLY).encode(), 30),
            "impostor": (good, json.dumps(REPLY).encode(), 0),      # names another node
            "caller": (good, json.dumps({**REPLY, "text": '<tool_call>{"name": "rm", '
                                         '"arguments": {}}</tool_call>', "confidence": 0.25,
                                         "finish_reason": "tool_calls"}).encode(), 0),
        }
        servers = []
        try:
            for name, (trust, body, delay) in fakes.items():
                server = ls.HttpServer(fake_peer(trust, body, delay), ls.HttpLimits(),
                                       "127.0.0.1", 0, ())
                await server.start()
                servers.append(server)
                node_id = NODE if name == "caller" else uuid.uuid4().hex
                a.fed.table.update(peer(node_id, name=name, port=server.port, interval=60))
            a.fed.table.update(peer(name="dead", port=free_port(), interval=60))
            started = time.monotonic()
            reply, _, swarm = await a.chat.complete(request(tools=TOOLS, swarm={"votes": 2}))
            took = time.monotonic() - started
            assert reply["choices"][0]["message"]["content"] == "Answer: 5"
            fate = {p["name"]: p for p in swarm["peers"]}
            assert set(fate) == {"liar", "garbled", "slow", "impostor", "dead", "caller"}
            assert "bad signature" in fate["liar"]["reason"]
            assert "not JSON" in fate["garbled"]["reason"]
            assert "no answer within" in fate["slow"]["reason"]
            assert "another node" in fate["impostor"]["reason"]
            assert "no answer" in fate["dead"]["reason"]
            assert fate["caller"]["status"] == "voted"
            assert all(fate[n]["status"] == "dropped" for n in fate if n != "caller")
            called = next(c for c in swarm["candidates"] if c["worker"] == "peer:caller")
            assert called["finish_reason"] == "stop"     # "rm" is no offered tool: text
            assert took < 5                               # the slow peer was not waited for
        finally:
            await a.stop()
            for server in servers:
                await server.stop()
    run(go())


def fake_peer(trust, body, delay):
    async def handle(request):
        await asyncio.sleep(delay)
        nonce = request.header(ls.NONCE_HEADER)
        return ls.Response(200, [("Content-Type", "application/json"), (
            ls.SIGNATURE_HEADER, trust.sign("reply", request.target, nonce, "200", body))], body)
    return handle


def test_federation_is_skipped_when_the_request_or_the_models_say_so():
    async def go():
        a = await node("Answer: 5", interval=60)
        b = await node("Answer: 9", name="beta", interval=60, model="other-model")
        know(a, b)
        try:
            assert a.fed.voters() == []          # another model: not without any_model
            _, _, swarm = await a.chat.complete(request())
            assert "peers" not in swarm and swarm["strategy"] == "single"
            a.fed.cfg = replace(a.fed.cfg, any_model=True)
            assert [p.name for p in a.fed.voters()] == ["beta"]
            for opts in ({"swarm": {"federate": False}}, {"temperature": 0},
                         {"swarm": {"mode": "fastest"}}):
                _, _, swarm = await a.chat.complete(request(**opts))
                assert "peers" not in swarm, opts
            assert b.chats() == 0
            _, _, swarm = await a.chat.complete(request())
            assert swarm["peers"][0]["status"] == "voted" and b.chats() == 1
            assert swarm["k"] == 1 and len(swarm["candidates"]) == 2
        finally:
            for n in (a, b):
                await n.stop()
    run(go())


def test_a_streamed_federated_vote_names_its_peers_on_the_last_chunk():
    async def go():
        a = await node("Answer: 5", interval=60)
        b = await node("Answer: 5", name="beta", interval=60)
        know(a, b)
        try:
            gen = ls.Generation()
            stream, plan = await a.chat.open_stream(request(stream=True), gen)
            assert plan.federate and plan.mode == "vote"
            events = [e async for e in stream]
            chunks = [json.loads(e[6:]) for e in events if e.startswith(b"data: {")]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                           if c["choices"])
            assert text == "Answer: 5" and events[-1] == ls.SSE_DONE
            assert chunks[-1]["swarm"]["peers"][0]["name"] == "beta"
        finally:
            for n in (a, b):
                await n.stop()
    run(go())


# -- real daemons ----------------------------------------------------------------------------------

LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"


@dataclass
class Daemon:
    """A daemon started in its own process group (killed whole in teardown), maybe in a netns."""

    proc: subprocess.Popen
    name: str
    ns: str | None = None
    url: str = ""
    output: list[str] = field(default_factory=list)

    def kill(self, sig=signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
        self.kill()                              # whatever of its group is left

    def logged(self, needle: str) -> float | None:
        """The time of the first log line holding `needle` (seconds since the epoch)."""
        for line in list(self.output):
            if needle in line:
                return datetime.strptime(line[:23], LOG_TIME).timestamp()
        return None

    def call(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        """An HTTP call to the daemon's API, from inside its namespace when it has one."""
        data = json.dumps(body).encode() if body is not None else None
        if self.ns is None:
            reply = httpx.request("POST" if data else "GET", self.url + path, content=data,
                                  timeout=120, trust_env=False)
            return reply.status_code, reply.json()
        out = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", NS_CLIENT,
                              self.url + path, (data or b"").decode()],
                             capture_output=True, text=True, timeout=150, check=True).stdout
        status, _, text = out.partition("\n")
        return int(status), json.loads(text)

    def peer_names(self) -> list[str]:
        status, peers = self.call(ls.PEERS_PATH)
        assert status == 200, peers
        return sorted(p["name"] for p in peers["data"])


NS_CLIENT = """
import sys, urllib.error, urllib.request
data = sys.argv[2].encode() or None
req = urllib.request.Request(sys.argv[1], data=data, headers={"Content-Type": "application/json"})
try:
    reply = urllib.request.urlopen(req, timeout=120)
    print(reply.status); print(reply.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""


def _pump(proc, sink):
    for line in proc.stdout:
        sink.append(line)


def start_daemons(specs, model_path) -> list[Daemon]:
    """Start one daemon per (name, netns or None, flags) at once; wait for every ready banner."""
    daemons = []
    try:
        for name, ns, flags in specs:
            cmd = [sys.executable, str(ROOT / "local_swarm.py"), "--model", str(model_path),
                   "--instances", "1", "--ctx", "2048", "--threads", "1", "--port", "0",
                   "--host", "127.0.0.1", "--node-name", name, *flags]
            if ns:
                cmd = ["ip", "netns", "exec", ns, *cmd]
            env = {k: v for k, v in os.environ.items() if k != ls.SECRET_ENV}
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, cwd=ROOT, env=env, start_new_session=True)
            d = Daemon(proc, name, ns)
            threading.Thread(target=_pump, args=(proc, d.output), daemon=True).start()
            daemons.append(d)
        deadline = time.monotonic() + 600
        for d in daemons:
            while not d.url:
                found = [m for line in list(d.output) if (m := READY_LINE.search(line))]
                if found:
                    d.url = found[0].group(1)
                elif d.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{d.name} did not start:\n" + "".join(d.output[-40:]))
                else:
                    time.sleep(0.2)
        return daemons
    except BaseException:
        for d in daemons:
            d.stop()
        raise


INTERVAL = 1.0


@pytest.fixture(scope="module")
def loopback_pair(smol_model_path):
    """Two daemons on loopback that know each other as static peers; their beacons go to their
    own port only (no broadcast at all)."""
    pa, pb = free_port(), free_port()

    def flags(own, other):
        return ["--secret", SECRET, "--beacon-interval", str(INTERVAL),
                "--federation-host", "127.0.0.1", "--federation-port", str(own),
                "--federation-broadcast", f"127.0.0.1:{own}", "--peer", f"127.0.0.1:{other}"]
    daemons = start_daemons([("loop-a", None, flags(pa, pb)), ("loop-b", None, flags(pb, pa))],
                            smol_model_path)
    yield daemons
    for d in daemons:
        d.stop()


def test_loopback_swarms_with_static_peers_vote_together(loopback_pair):
    a, b = loopback_pair
    deadline = time.monotonic() + 4 * INTERVAL
    while (a.peer_names(), b.peer_names()) != (["loop-b"], ["loop-a"]):
        assert time.monotonic() < deadline, (a.peer_names(), b.peer_names())
        time.sleep(0.2)
    status, peers = a.call(ls.PEERS_PATH)
    assert peers["data"][0]["source"] == "static"
    status, reply = a.call("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8})
    assert status == 200 and reply["choices"][0]["message"]["content"]
    fate = reply["swarm"]["peers"]
    assert [(p["name"], p["status"]) for p in fate] == [("loop-b", "voted")], fate
    assert "peer:loop-b" in [c["worker"] for c in reply["swarm"]["candidates"]]
    with httpx.stream("POST", a.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
            timeout=120, trust_env=False) as streamed:
        lines = [line for line in streamed.iter_lines() if line.startswith("data: {")]
    assert json.loads(lines[-1][6:])["swarm"]["peers"][0]["status"] == "voted"


def test_a_killed_loopback_swarm_leaves_its_peers_table(loopback_pair):
    a, b = loopback_pair
    assert a.peer_names() == ["loop-b"]
    b.kill()
    killed = time.monotonic()
    while a.peer_names():
        assert time.monotonic() - killed < (ls.PEER_EXPIRY_BEACONS + 1) * INTERVAL + 2
        time.sleep(0.2)
    status, reply = a.call("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert status == 200 and "peers" not in reply["swarm"]        # local only again


def test_without_a_secret_federation_is_off_and_no_udp_socket_opens(swarm):
    reply = httpx.get(swarm.url + ls.STATUS_PATH, timeout=10)
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "federation_disabled"
    assert any("federation is off" in line for line in swarm.output)
    process = psutil.Process(swarm.proc.pid)
    sockets = getattr(process, "net_connections", process.connections)    # psutil < 6
    assert sockets(kind="udp") == []


# -- three swarms and a stranger in network namespaces ---------------------------------------------

LAN = "10.77.0"


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def bridged_namespaces(count):
    """`count` network namespaces, each with eth0 (LAN.i/24) on one bridge in a hub namespace,
    and lo up. Every device is created inside the namespaces: the root namespace's interfaces
    are never touched. Deleted on exit, even on failure."""
    tag = f"lsfed{os.getpid()}"
    hub, spaces = f"{tag}-hub", [f"{tag}-{i}" for i in range(1, count + 1)]
    made = []
    try:
        _ip("netns", "add", hub)
        made.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, ns in enumerate(spaces, 1):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", "name", f"v{i}", "netns", hub, "type", "veth", "peer", "name",
                "eth0", "netns", ns)
            _ip("-n", hub, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{LAN}.{i}/24", "brd", "+", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield spaces
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here; None if they can."""
    if shutil.which("ip") is None:
        return "the `ip` command is missing"
    if os.geteuid() != 0:
        return "not running as root"
    probe = f"lsfedprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"`ip netns add` failed: {made.stderr.strip()}"


@pytest.fixture(scope="module")
def lan(smol_model_path):
    """Three swarms with the secret and one stranger with another, one per namespace, beaconing
    on their LAN's real broadcast address (the default targets) every INTERVAL seconds."""
    why = namespaces_unavailable()
    if why:
        message = (f"NETWORK NAMESPACES CANNOT BE MADE ({why}): the multi-host federation test "
                   "does not run here; the loopback variant with static peers covers less")
        print("\n" + "!" * 100 + "\n" + message + "\n" + "!" * 100, file=sys.stderr)
        pytest.skip(message)
    with bridged_namespaces(4) as spaces:
        flags = ["--beacon-interval", str(INTERVAL)]
        specs = [(f"fed{i}", ns, ["--secret", SECRET if i < 4 else OTHER, *flags])
                 for i, ns in enumerate(spaces, 1)]
        daemons = start_daemons(specs, smol_model_path)
        try:
            yield daemons
        finally:
            for d in daemons:
                d.stop()


def test_namespaced_swarms_find_each_other_within_two_beacon_intervals(lan):
    swarms, stranger = lan[:3], lan[3]
    for d in swarms:
        others = sorted(o.name for o in swarms if o is not d)
        deadline = time.monotonic() + 2 * INTERVAL
        while d.peer_names() != others:
            assert time.monotonic() < deadline, (d.name, d.peer_names())
            time.sleep(0.2)
        for o in swarms:
            if o is d:
                continue
            found = d.logged(f"federation: found {o.name} at http://{LAN}.")
            both_up = max(d.logged("federation: node "), o.logged("federation: node "))
            assert found is not None and found - both_up <= 2 * INTERVAL, (d.name, o.name)
    status, peers = swarms[0].call(ls.PEERS_PATH)
    hosts = sorted(p["host"] for p in peers["data"])
    assert hosts == [f"{LAN}.2", f"{LAN}.3"] and {p["source"] for p in peers["data"]} == \
        {"discovered"}
    assert stranger.peer_names() == []


def test_a_federated_vote_in_the_namespaces_includes_the_other_two(lan):
    status, reply = lan[0].call("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 12})
    assert status == 200, reply
    fate = {p["name"]: p["status"] for p in reply["swarm"]["peers"]}
    assert fate == {"fed2": "voted", "fed3": "voted"}, reply["swarm"]["peers"]
    assert len(reply["swarm"]["candidates"]) == 3


def test_a_swarm_with_the_wrong_secret_is_never_listed(lan):
    swarms, stranger = lan[:3], lan[3]
    for d in swarms:           # once it has refused the stranger's beacons, it never lists it
        assert wait_for(lambda: d.logged(f"refusing beacons from {LAN}.4") is not None), d.name
        assert "fed4" not in d.peer_names()
    assert stranger.peer_names() == []


def test_a_killed_namespaced_swarm_leaves_the_others_tables_within_the_expiry(lan):
    victim = lan[2]
    victim.kill()
    killed = time.monotonic()
    limit = (ls.PEER_EXPIRY_BEACONS + 1) * INTERVAL + 2
    for d in lan[:2]:
        while "fed3" in d.peer_names():
            assert time.monotonic() - killed < limit, d.name
            time.sleep(0.2)
    assert lan[0].peer_names() == ["fed2"] and lan[1].peer_names() == ["fed1"]

"""Random loss on the lab switch with nftables: the planned LossRuleOps as `nft -j` JSON
documents (data, never command strings), and the runner that feeds them to `nft` inside the
switch namespace (`ip netns exec <ns> nft -j`), checks the lab's chain holds exactly the lab's
rules, and changes them in one transaction. It never touches a table the lab did not create.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Sequence

from netem.errors import NetemError
from netem.linkchange import RuleChange
from netem.plan import NUMGEN_MOD, LossRuleOp

NFT_FAMILY = "bridge"
NFT_TABLE = "dualpath"
NFT_CHAIN = "forward"
"""The lab's nftables table in its switch namespace, made when some NIC has random loss."""

LIST_CHAIN = f"nft list chain {NFT_FAMILY} {NFT_TABLE} {NFT_CHAIN}"


# --- documents (`nft -j -f -` input) ---------------------------------------------------------
def nft_setup() -> list[dict[str, object]]:
    """Create the lab's table and chain. `create` fails if the table exists, so a table the
    lab did not make is never adopted."""
    return [
        {"create": {"table": {"family": NFT_FAMILY, "name": NFT_TABLE}}},
        {
            "create": {
                "chain": {
                    "family": NFT_FAMILY,
                    "table": NFT_TABLE,
                    "name": NFT_CHAIN,
                    "type": "filter",
                    "hook": "forward",
                    "prio": 0,
                    "policy": "accept",
                }
            }
        },
    ]


def nft_rule(rule: LossRuleOp, *, handle: int | None = None) -> dict[str, object]:
    """The rule object: `<match> "<port>" numgen random mod 1000000 < threshold counter drop`."""
    body: dict[str, object] = {
        "family": NFT_FAMILY,
        "table": NFT_TABLE,
        "chain": NFT_CHAIN,
        "comment": rule.comment,
        "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": rule.match}}, "right": rule.port}},
            {
                "match": {
                    "op": "<",
                    "left": {"numgen": {"mode": "random", "mod": NUMGEN_MOD, "offset": 0}},
                    "right": rule.threshold,
                }
            },
            {"counter": None},
            {"drop": None},
        ],
    }
    if handle is not None:
        body["handle"] = handle
    return {"rule": body}


def nft_batch(commands: list[dict[str, object]]) -> dict[str, object]:
    return {"nftables": commands}


def describe_rule(rule: LossRuleOp) -> str:
    """The rule in nft's own words, for the lab record only (never executed)."""
    return (
        f"nft rule {NFT_FAMILY} {NFT_TABLE} {NFT_CHAIN} {rule.match} {rule.port} "
        f"numgen random mod {NUMGEN_MOD} < {rule.threshold} counter drop "
        f'comment "{rule.comment}"'
    )


def describe_table(rules: Iterable[LossRuleOp]) -> list[str]:
    """The lab's table, chain and `rules`, for the lab record."""
    return [f"nft table {NFT_FAMILY} {NFT_TABLE}, chain {NFT_CHAIN}"] + [
        describe_rule(r) for r in rules
    ]


# --- running nft -------------------------------------------------------------------------------
def nft(namespace: str, args: Sequence[str], document: dict[str, object] | None = None) -> str:
    """Run `nft -j ARGS` inside `namespace` (an argv, never a shell); JSON in on stdin."""
    argv = ["ip", "netns", "exec", namespace, "nft", "-j", *args]
    operation = " ".join(argv)
    payload = json.dumps(document) if document is not None else None
    try:
        done = subprocess.run(
            argv, input=payload, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetemError(f"{operation} failed: {exc}", operation=operation) from exc
    if done.returncode != 0:
        detail = done.stderr.strip() or f"exit status {done.returncode}"
        if payload is not None:
            detail += f" (input: {payload})"
        raise NetemError(f"{operation} failed: {detail}", operation=operation)
    return done.stdout


def create_table(namespace: str, rules: Sequence[LossRuleOp] = ()) -> None:
    """Create the lab's table and chain with `rules`, in one transaction (all, or nothing).
    Fails if the table exists: one the lab did not make is never adopted."""
    nft(namespace, ["-f", "-"], nft_batch(nft_setup() + [{"add": nft_rule(r)} for r in rules]))


def rule_handles(namespace: str) -> dict[str, int]:
    """comment -> rule handle of the lab's loss chain. A rule without one of the lab's
    comments is foreign: raise."""
    out = nft(namespace, ["-a", "list", "chain", NFT_FAMILY, NFT_TABLE, NFT_CHAIN])
    handles: dict[str, int] = {}
    for item in json.loads(out).get("nftables", []):
        rule = item.get("rule")
        if rule is None:
            continue
        comment = rule.get("comment")
        if not isinstance(comment, str) or comment in handles:
            raise NetemError(
                f"the nft chain {NFT_FAMILY} {NFT_TABLE} {NFT_CHAIN} in {namespace} has a rule "
                f"this lab did not make (handle {rule.get('handle')}); refusing to change it",
                operation=LIST_CHAIN,
            )
        handles[comment] = int(rule["handle"])
    return handles


def check_rules(namespace: str, planned: Iterable[LossRuleOp], *, table_made: bool) -> None:
    """The lab's chain holds exactly the `planned` rules (by comment); no table yet (the lab
    has not made it) holds none."""
    have = rule_handles(namespace) if table_made else {}
    want = {r.comment for r in planned}
    if set(have) != want:
        raise NetemError(
            f"the nft chain in {namespace} has rules {sorted(have)}, "
            f"the lab planned {sorted(want)}; refusing to change it",
            operation=LIST_CHAIN,
        )


def apply_rule_changes(namespace: str, changes: Sequence[RuleChange]) -> None:
    """One nft transaction: all the rule changes happen, or none."""
    if not changes:
        return
    handles = rule_handles(namespace)
    commands: list[dict[str, object]] = []
    for change in changes:
        rule = change.rule
        handle = handles.get(rule.comment)
        if change.verb == "add":
            if handle is not None:
                raise NetemError(f"nft rule {rule.comment!r} already exists in {namespace}")
            commands.append({"add": nft_rule(rule)})
            continue
        if handle is None:
            raise NetemError(
                f"nft rule {rule.comment!r} is missing in {namespace}; refusing to change it",
                operation=LIST_CHAIN,
            )
        if change.verb == "replace":
            commands.append({"replace": nft_rule(rule, handle=handle)})
        else:
            commands.append(
                {
                    "delete": {
                        "rule": {
                            "family": NFT_FAMILY,
                            "table": NFT_TABLE,
                            "chain": NFT_CHAIN,
                            "handle": handle,
                        }
                    }
                }
            )
    nft(namespace, ["-f", "-"], nft_batch(commands))

"""Aliases of registered versions: point one at a version (every flavor), roll it back, list what runs where.

The gate policy decides who may hold @production (deploy/policy.py). Each move is written into the version tags:
`alias.{name}` (when, by what, the gate verdict), `alias.{name}.previous` (the version that held it before, which
a rollback returns to) and `alias.{name}.history` (the last events, newest last).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from core.errors import UserError
from deploy.model_card import ALIASES_NOW, with_aliases
from deploy.policy import PRODUCTION, check_production, is_production, production_refusal
from deploy.registry import INT8_FLAVOR, INT8_LINK_TAG, ONNX_LINK_TAG, resolve_version

HISTORY_CHARS = 4000  # MLflow keeps tag values up to 5000 characters (8000 on newer stores)


@dataclass
class Move:
    name: str
    version: str
    alias: str
    previous: str | None  # the version that held the alias before, if another

    def line(self) -> str:
        was = f" (was v{self.previous})" if self.previous else ""
        if is_production(self.alias):
            return f"🏆 Model {self.name} v{self.version} promoted to Production!{was}"
        return f"🏷️  Model {self.name} v{self.version} is now @{self.alias}{was}"


def describe(moves: list[Move]) -> str:
    """One line for the PyTorch version (the original project's wording for production), one per ONNX twin."""
    lines = [moves[0].line()]
    lines += [f"   {'int8 ' if m.name.endswith(INT8_FLAVOR) else ''}ONNX twin {m.name} v{m.version} is @{m.alias} too"
              for m in moves[1:]]
    return "\n".join(lines)


def holder(client, name: str, alias: str) -> str | None:
    """The version number that holds `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _append_history(client, name: str, version: str, alias: str, event: str) -> None:
    key = f"alias.{alias}.history"
    old = (resolve_version(client, name, version=version).tags or {}).get(key, "")
    text = "\n".join(filter(None, [old, event]))
    client.set_model_version_tag(name, version, key, text[-HISTORY_CHARS:].partition("\n")[2]
                                 if len(text) > HISTORY_CHARS else text)


def _move_one(client, name: str, version: str, alias: str, how: str, status: str, rollback: bool) -> Move:
    previous = holder(client, name, alias)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, f"alias.{alias}", f"set {stamp} by {how} (gates {status})")
    moved = previous is not None and previous != version
    if moved and not rollback:  # a rollback keeps the chain: the next rollback goes further back
        client.set_model_version_tag(name, version, f"alias.{alias}.previous", previous)
    _append_history(client, name, version, alias, f"{stamp} set by {how}" + (f" (was v{previous})" if moved else ""))
    if moved:
        _append_history(client, name, previous, alias, f"{stamp} moved to v{version} by {how}")
    return Move(name, version, alias, previous if moved else None)


def move_alias(client, mv, alias: str, how: str, promote_on: str = "point", rollback: bool = False) -> list[Move]:
    """Point `alias` at the PyTorch version mv and its ONNX twins (fp32, and int8 when registered); @production
    only for a version that passed."""
    check_production(alias, mv.tags or {}, f"{mv.name} v{mv.version}", promote_on)
    status = (mv.tags or {}).get("medical_validation", "missing")
    moves = [_move_one(client, mv.name, str(mv.version), alias, how, status, rollback)]
    for tag, suffix in ((ONNX_LINK_TAG, "onnx"), (INT8_LINK_TAG, INT8_FLAVOR)):
        twin = (mv.tags or {}).get(tag)
        if twin:
            moves.append(_move_one(client, f"{mv.name}-{suffix}", twin, alias, how, status, rollback))
    for move in moves:  # the model cards in the versions' descriptions say where the aliases are now
        for version in filter(None, (move.version, move.previous)):
            refresh_card(client, move.name, version)
    return moves


def refresh_card(client, name: str, version: str) -> str | None:
    """Bring the aliases line of a version's model card (its description) up to date; the new description."""
    mv = client.get_model_version(name, version)
    if not mv.description or ALIASES_NOW not in mv.description:
        return None
    description = with_aliases(mv.description, mv.aliases or [])
    client.update_model_version(name, version, description=description)
    return description


def rollback_alias(client, name: str, alias: str, how: str, promote_on: str = "point") -> list[Move]:
    """Return `alias` to the version that held it before the current one."""
    current = holder(client, name, alias)
    if current is None:
        raise UserError(f"{name} has no @{alias}; nothing to roll back")
    previous = (resolve_version(client, name, version=current).tags or {}).get(f"alias.{alias}.previous")
    if not previous:
        raise UserError(f"{name} v{current} is the first version recorded at @{alias}; nothing to roll back to")
    return move_alias(client, resolve_version(client, name, version=previous), alias, how, promote_on,
                      rollback=True)


def deployment_lines(client, name: str, promote_on: str = "point") -> list[str]:
    """What runs where: each alias with its version, then every version with its validation status."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases
        versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version),
                          reverse=True)
    except MlflowException:
        raise UserError(f"no registered model named {name}") from None
    by_number = {str(mv.version): mv for mv in versions}
    lines = [f"📦 {name}: {len(versions)} version(s)"]
    for alias, number in sorted(aliases.items()):
        tags = by_number[str(number)].tags if str(number) in by_number else {}
        lines.append(f"  @{alias:<12} -> v{number:<4} {_status_text(tags)}")
    if not aliases:
        lines.append(f"  (no alias; inference needs @{PRODUCTION} or --version)")
    for mv in versions:
        held = " ".join(f"@{a}" for a, v in sorted(aliases.items()) if str(v) == str(mv.version))
        refusal = production_refusal(mv.tags or {}, promote_on)
        lines.append(f"  v{mv.version:<4} {mv.tags.get('semver', '?'):<28} {_status_text(mv.tags):<38} "
                     f"{'production: ok' if refusal is None else 'production: no'} {held}".rstrip())
    return lines


def _status_text(tags: dict) -> str:
    text = f"medical validation {tags.get('medical_validation', 'missing')}"
    if tags.get("forced") == "true":
        text += ", FORCED"
    if tags.get("auto_registered") == "true":
        text += ", auto"
    return text

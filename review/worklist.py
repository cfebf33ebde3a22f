"""The worklist and the verdicts: which predictions wait for a reviewer, what a case holds, and recording a verdict.

Every item's current verdict is its latest row in review_verdicts; earlier rows stay as they were. By default the
pending items come least certain first, so reviewers spend their time where the model is least sure.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Engine, and_, func, insert, literal, select, tuple_

from review.schema import cases, flags, items, verdicts, withdrawn
from serving.audit import predictions

# What a reader may find that is none of the model's classes: stored as a finding, never exported as a class
FINDINGS = {"no_tumour": "no tumour / normal", "non_diagnostic": "non-diagnostic", "other": "other"}
REFER_CONFIRMED = "refer_confirmed"  # on a referred case: the reader confirms the referral (no class)
LABELS = {**FINDINGS, REFER_CONFIRMED: "referral confirmed"}
STATUSES = ("pending", "reviewed", "disagreements", "referred", "all")
SORTS = {"confidence": items.c.confidence, "created": items.c.created_at, "class": items.c.predicted_class}
PAGE = 100


@dataclass(frozen=True)
class Query:
    status: str = "pending"
    sort: str = "confidence"
    descending: bool = False
    predicted: str | None = None  # one predicted class only
    page: int = 0


def _latest():
    """The id of each prediction's latest verdict."""
    return (select(verdicts.c.prediction_id, func.max(verdicts.c.id).label("vid"))
            .where(verdicts.c.id.not_in(select(withdrawn.c.verdict_id)))
            .group_by(verdicts.c.prediction_id).subquery("latest"))


def _item_select():
    latest = _latest()
    current = verdicts.alias("current")
    query = (select(items, cases.c.filename, cases.c.source, cases.c.client, cases.c.frames,
                    predictions.c.model_name, current.c.agrees, current.c.reviewer_class, current.c.reviewer,
                    current.c.finding, current.c.created_at.label("reviewed_at"))
             .join(cases, cases.c.id == items.c.case_id)
             .join(predictions, predictions.c.id == items.c.prediction_id)
             .outerjoin(latest, latest.c.prediction_id == items.c.prediction_id)
             .outerjoin(current, current.c.id == latest.c.vid))
    return query, current


def _status_filter(status: str, current):
    return {"pending": current.c.id.is_(None), "reviewed": current.c.id.is_not(None),
            "disagreements": current.c.agrees.is_(False), "referred": items.c.refer.is_(True)}.get(status)


def list_items(engine: Engine, q: Query) -> list[dict]:
    query, current = _item_select()
    where = _status_filter(q.status, current)
    if where is not None:
        query = query.where(where)
    if q.predicted:
        query = query.where(items.c.predicted_class == q.predicted)
    column = SORTS.get(q.sort, items.c.confidence)
    query = query.order_by(column.desc() if q.descending else column.asc(), items.c.created_at, items.c.frame)
    with engine.connect() as conn:
        rows = conn.execute(query.limit(PAGE).offset(max(0, q.page) * PAGE)).mappings().all()
    return [_item(r) for r in rows]


def _item(row) -> dict:
    d = dict(row)
    d["probabilities"] = json.loads(d.pop("probabilities_json"))
    d.update(json.loads(d.pop("reasons_json")))
    d["status"] = status_of(d["agrees"], d["finding"])
    return d


def status_of(agrees: bool | None, finding: str | None) -> str:
    if agrees is None:
        return "pending"
    if finding:
        return "referral confirmed" if finding == REFER_CONFIRMED else "finding"
    return "agreed" if agrees else "disagreed"


def counts(engine: Engine) -> dict[str, int]:
    query, current = _item_select()
    inner = query.subquery()
    with engine.connect() as conn:
        row = conn.execute(select(
            func.count().label("all"),
            func.count().filter(inner.c.agrees.is_(None)).label("pending"),
            func.count().filter(inner.c.agrees.is_not(None)).label("reviewed"),
            func.count().filter(inner.c.agrees.is_(False)).label("disagreements"),
            func.count().filter(inner.c.refer.is_(True)).label("referred"))).mappings().one()
    return dict(row)


def case_items(engine: Engine, case_id: str) -> list[dict]:
    """The case's items (one per frame) with their prediction's audit facts, in frame order."""
    return items_where(engine, items.c.case_id == case_id)


def items_where(engine: Engine, where, limit: int | None = None) -> list[dict]:
    """The items a condition selects (at most `limit`, the newest), with their prediction's audit facts and kept
    file, in case and frame order."""
    query, _ = _item_select()
    query = query.add_columns(predictions.c.output_json, predictions.c.study_uid, predictions.c.series_uid,
                              predictions.c.sop_instance_uid, cases.c.file_ref, cases.c.batch).where(where)
    if limit is not None:
        newest = select(items.c.prediction_id).order_by(items.c.created_at.desc()).limit(limit)
        query = query.where(items.c.prediction_id.in_(newest.scalar_subquery()))
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(items.c.case_id, items.c.frame)).mappings().all()
    out = []
    for r in rows:
        item = _item({k: v for k, v in r.items() if k != "output_json"})
        item["class_index"] = json.loads(r["output_json"])["class_index"]
        out.append(item)
    return out


def case_row(engine: Engine, case_id: str) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(select(cases).where(cases.c.id == case_id)).mappings().first()
    return dict(row) if row else None


def history(engine: Engine, case_id: str) -> list[dict]:
    """Every verdict given on the case, oldest first (a changed verdict is a later row)."""
    with engine.connect() as conn:
        rows = conn.execute(select(verdicts, items.c.frame, withdrawn.c.created_at.label("withdrawn_at"))
                            .join(items, items.c.prediction_id == verdicts.c.prediction_id)
                            .outerjoin(withdrawn, withdrawn.c.verdict_id == verdicts.c.id)
                            .where(verdicts.c.case_id == case_id).order_by(verdicts.c.id)).mappings().all()
    return [dict(r) for r in rows]


@dataclass(frozen=True)
class Verdict:
    """What a reader said about one worklist item: agreement, a class (any of the model's: the predicted one is
    agreement), or a finding that is no class (FINDINGS, or REFER_CONFIRMED on a referred item); the slices they
    flagged (prediction ids of the same case, or series) go with it."""
    prediction_id: str
    agrees: bool
    reviewer_class: str | None = None
    note: str | None = None
    finding: str | None = None
    flagged: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reading:
    """What a verdict judges: one item's reading, or a series' (its class and refer flag) over all its slices."""
    predicted_class: str
    classes: tuple[str, ...]
    refer: bool
    prediction_ids: tuple[str, ...]


def _judged(verdict: Verdict, reading: Reading) -> tuple[bool, str, str | None]:
    """(agrees, reviewer_class, finding) as stored; ValueError for what the reading does not allow."""
    if verdict.finding == REFER_CONFIRMED:
        if not reading.refer:
            raise ValueError("this case was not referred: agree or name a class")
        return True, LABELS[REFER_CONFIRMED], REFER_CONFIRMED
    if verdict.finding:
        if verdict.finding not in FINDINGS:
            raise ValueError(f"unknown finding {verdict.finding!r}: choose one of {', '.join(FINDINGS.values())}")
        return False, FINDINGS[verdict.finding], verdict.finding
    if verdict.agrees:
        if reading.refer:
            raise ValueError("this case was referred: confirm the referral or name the class you see")
        return True, reading.predicted_class, None
    if verdict.reviewer_class not in reading.classes:
        raise ValueError(f"choose one of the classes: {', '.join(reading.classes)}")
    return verdict.reviewer_class == reading.predicted_class, verdict.reviewer_class, None


def record_verdict(engine: Engine, verdict: Verdict, reviewer_id: int, reviewer: str,
                   series: Reading | None = None) -> int:
    """New verdict rows (never an update): on one worklist item, or with `series` on each of the series' slices
    (the series' class is what the model said), with the flagged slices; returns the id of the item's row.
    ValueError for an unknown item, a class the model does not have or a choice the reading does not allow."""
    with engine.begin() as conn:
        item = conn.execute(select(items.c.case_id, items.c.predicted_class, items.c.probabilities_json,
                                   items.c.refer).where(items.c.prediction_id == verdict.prediction_id)).first()
        if item is None:
            raise ValueError("no such case on the worklist")
        own = conn.execute(select(items.c.prediction_id).where(items.c.case_id == item.case_id)).scalars().all()
        reading = series or Reading(item.predicted_class, tuple(json.loads(item.probabilities_json)), item.refer,
                                    (verdict.prediction_id,))
        if verdict.prediction_id not in reading.prediction_ids:
            raise ValueError("the item is not part of the series judged")
        agrees, said, finding = _judged(verdict, reading)
        flagged = set(verdict.flagged)
        if not flagged <= set(reading.prediction_ids if series else own):
            raise ValueError("a flagged slice is not part of this case")
        note, now = (verdict.note or "").strip()[:2000] or None, datetime.now(timezone.utc)
        cases_of = dict(conn.execute(select(items.c.prediction_id, items.c.case_id)
                                     .where(items.c.prediction_id.in_(reading.prediction_ids))).all())
        ids = {}
        for pid in (verdict.prediction_id, *[p for p in reading.prediction_ids if p != verdict.prediction_id]):
            ids[pid] = conn.execute(insert(verdicts).values(
                prediction_id=pid, case_id=cases_of[pid], reviewer_id=reviewer_id, reviewer=reviewer, agrees=agrees,
                predicted_class=reading.predicted_class, reviewer_class=said, note=note, finding=finding,
                created_at=now)).inserted_primary_key[0]
        if flagged:
            conn.execute(insert(flags), [{"verdict_id": ids.get(p, ids[verdict.prediction_id]), "prediction_id": p}
                                         for p in sorted(flagged)])
        return ids[verdict.prediction_id]


def saved_verdict(engine: Engine, verdict_id: int, reviewer_id: int) -> dict | None:
    """One of the reviewer's own verdicts, as the page says it was saved (None for another's or an unknown id)."""
    with engine.connect() as conn:
        row = conn.execute(select(verdicts, items.c.frame, withdrawn.c.created_at.label("withdrawn_at"))
                           .join(items, items.c.prediction_id == verdicts.c.prediction_id)
                           .outerjoin(withdrawn, withdrawn.c.verdict_id == verdicts.c.id)
                           .where(verdicts.c.id == verdict_id, verdicts.c.reviewer_id == reviewer_id)
                           ).mappings().first()
        if row is None:
            return None
        given_with = select(verdicts.c.id).where(verdicts.c.reviewer_id == reviewer_id, verdicts.c.id >= verdict_id,
                                                 verdicts.c.created_at == row["created_at"])
        slices = conn.execute(select(func.count()).select_from(given_with.subquery())).scalar()
        flagged = conn.execute(select(func.count()).where(flags.c.verdict_id.in_(given_with))).scalar()
    return {**dict(row), "status": status_of(row["agrees"], row["finding"]), "flagged": flagged, "slices": slices}


def withdraw(engine: Engine, verdict_id: int, reviewer_id: int, within_seconds: float) -> dict:
    """Undo one of the reviewer's own verdicts within `within_seconds` of giving it: the verdict before it (or
    none) is current again; the row itself stays, marked withdrawn. ValueError when that is no longer possible."""
    with engine.begin() as conn:
        row = conn.execute(select(verdicts.c.created_at, verdicts.c.case_id, verdicts.c.prediction_id, items.c.frame)
                           .join(items, items.c.prediction_id == verdicts.c.prediction_id)
                           .where(verdicts.c.id == verdict_id, verdicts.c.reviewer_id == reviewer_id)).first()
        if row is None:
            raise ValueError("no such verdict of yours")
        now = datetime.now(timezone.utc)
        given = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=timezone.utc)
        if (now - given).total_seconds() > within_seconds:
            raise ValueError(f"a verdict can be undone for {within_seconds:g} seconds; give a new one instead")
        given_with = conn.execute(select(verdicts.c.id).where(
            verdicts.c.reviewer_id == reviewer_id, verdicts.c.created_at == row.created_at,
            verdicts.c.id >= verdict_id, verdicts.c.id.not_in(select(withdrawn.c.verdict_id)))).scalars().all()
        if given_with:  # a series verdict: the rows of its other slices, given at the same moment
            conn.execute(insert(withdrawn), [{"verdict_id": v, "created_at": now} for v in given_with])
    return {"case_id": row.case_id, "prediction_id": row.prediction_id, "frame": row.frame}


def _order_key():
    return tuple_(items.c.confidence, items.c.created_at, func.coalesce(items.c.frame, 0), items.c.prediction_id)


def neighbour(engine: Engine, prediction_id: str, forward: bool = True, pending_only: bool = True) -> dict | None:
    """The item after (or before) one in the worklist's default order (least certain first): skip and previous."""
    query, current = _item_select()
    with engine.connect() as conn:
        here = conn.execute(select(items.c.confidence, items.c.created_at, func.coalesce(items.c.frame, 0),
                                   literal(prediction_id)).where(items.c.prediction_id == prediction_id)).first()
        if here is None:
            return None
        key = _order_key()
        query = query.where(key > tuple_(*here) if forward else key < tuple_(*here))
        if pending_only:
            query = query.where(current.c.id.is_(None))
        order = [c if forward else c.desc() for c in key.clauses]
        row = conn.execute(query.order_by(*order).limit(1)).mappings().first()
    return dict(row) if row else None


def next_pending(engine: Engine, after: str | None = None) -> dict | None:
    """The first pending item in the default order (least certain first), other than `after`."""
    query, current = _item_select()
    query = query.where(current.c.id.is_(None))
    if after:
        query = query.where(items.c.prediction_id != after)
    query = query.order_by(items.c.confidence.asc(), items.c.created_at, items.c.frame).limit(1)
    with engine.connect() as conn:
        row = conn.execute(query).mappings().first()
    return dict(row) if row else None


def heat_facts(engine: Engine, prediction_id: str) -> dict | None:
    """What drawing a prediction's heat map needs: its file, frame, class index and model version."""
    with engine.connect() as conn:
        row = conn.execute(select(cases.c.file_ref, items.c.frame, predictions.c.output_json,
                                  predictions.c.model_name, predictions.c.model_version)
                           .join(items, items.c.case_id == cases.c.id)
                           .join(predictions, predictions.c.id == items.c.prediction_id)
                           .where(and_(items.c.prediction_id == prediction_id))).mappings().first()
    if row is None:
        return None
    return {"file_ref": row["file_ref"], "frame": row["frame"], "model": row["model_name"],
            "version": row["model_version"], "class_index": json.loads(row["output_json"])["class_index"]}

"""The worklist and the verdicts: which predictions wait for a reviewer, what a case holds, and recording a verdict.

Every item's current verdict is its latest row in review_verdicts; earlier rows stay as they were. By default the
pending items come least certain first, so reviewers spend their time where the model is least sure.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Engine, and_, func, insert, select

from review.schema import cases, items, verdicts
from serving.audit import predictions

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
            .group_by(verdicts.c.prediction_id).subquery("latest"))


def _item_select():
    latest = _latest()
    current = verdicts.alias("current")
    query = (select(items, cases.c.filename, cases.c.source, cases.c.client, cases.c.frames,
                    predictions.c.model_name, current.c.agrees, current.c.reviewer_class, current.c.reviewer,
                    current.c.created_at.label("reviewed_at"))
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
    d["status"] = "pending" if d["agrees"] is None else ("agreed" if d["agrees"] else "disagreed")
    return d


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
    query, _ = _item_select()
    query = query.add_columns(predictions.c.output_json, predictions.c.study_uid, predictions.c.series_uid,
                              predictions.c.sop_instance_uid)
    with engine.connect() as conn:
        rows = conn.execute(query.where(items.c.case_id == case_id).order_by(items.c.frame)).mappings().all()
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
        rows = conn.execute(select(verdicts, items.c.frame)
                            .join(items, items.c.prediction_id == verdicts.c.prediction_id)
                            .where(verdicts.c.case_id == case_id).order_by(verdicts.c.id)).mappings().all()
    return [dict(r) for r in rows]


@dataclass(frozen=True)
class Verdict:
    prediction_id: str
    agrees: bool
    reviewer_class: str | None  # required when the reviewer disagrees
    note: str | None = None


def record_verdict(engine: Engine, verdict: Verdict, reviewer_id: int, reviewer: str) -> int:
    """A new verdict row on one worklist item (never an update); returns its id. ValueError for an unknown item or
    a class the model does not have."""
    with engine.begin() as conn:
        item = conn.execute(select(items.c.case_id, items.c.predicted_class, items.c.probabilities_json)
                            .where(items.c.prediction_id == verdict.prediction_id)).first()
        if item is None:
            raise ValueError("no such case on the worklist")
        classes = list(json.loads(item.probabilities_json))
        said = item.predicted_class if verdict.agrees else verdict.reviewer_class
        if said not in classes or (not verdict.agrees and said == item.predicted_class):
            others = ", ".join(c for c in classes if c != item.predicted_class)
            raise ValueError(f"choose one of the other classes: {others}")
        note = (verdict.note or "").strip()[:2000] or None
        return conn.execute(insert(verdicts).values(
            prediction_id=verdict.prediction_id, case_id=item.case_id, reviewer_id=reviewer_id, reviewer=reviewer,
            agrees=verdict.agrees, predicted_class=item.predicted_class, reviewer_class=said, note=note,
            created_at=datetime.now(timezone.utc))).inserted_primary_key[0]


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

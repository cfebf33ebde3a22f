"""Leak-free, stratified, deterministic train/val/test assignment.

Images that must not be separated (byte-identical files, one patient's slices) form a group;
whole groups are dealt to splits so each class reaches its target share.
"""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict

SPLITS = ("train", "val", "test")


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_items(names: list[str], hashes: list[str], group_pattern: str | None = None,
                series: list[str | None] | None = None) -> list[int]:
    """Group id per item: same hash (frames of one file share it), same id matched by `group_pattern` on the
    file name, or same DICOM series."""
    uf = _UnionFind(len(names))
    first_by_key: dict[tuple[str, str], int] = {}
    regex = re.compile(group_pattern) if group_pattern else None
    for i, (name, digest) in enumerate(zip(names, hashes)):
        keys = [("sha", digest)]
        if regex is not None and (m := regex.search(name)):
            keys.append(("id", m.group(1) if m.groups() else m.group(0)))
        if series is not None and series[i]:
            keys.append(("series", series[i]))
        for key in keys:
            if key in first_by_key:
                uf.union(first_by_key[key], i)
            else:
                first_by_key[key] = i
    return [uf.find(i) for i in range(len(names))]


def _targets(n: int, ratios: tuple[float, float, float]) -> list[int]:
    """Largest-remainder rounding: integer targets that sum to n."""
    raw = [n * r for r in ratios]
    base = [int(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda k: raw[k] - base[k], reverse=True)
    for k in order[: n - sum(base)]:
        base[k] += 1
    return base


def assign_splits(
    labels: list[str],
    groups: list[int],
    ratios: tuple[float, float, float],
    seed: int,
    splits: tuple[str, ...] = SPLITS,
) -> list[str]:
    """Deal whole groups to splits, per class (by the group's majority label), largest deficit first."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_class: dict[str, list[int]] = defaultdict(list)
    for g, idx in members.items():
        majority = Counter(labels[i] for i in idx).most_common(1)[0][0]
        by_class[majority].append(g)

    rng = random.Random(seed)
    result = [""] * len(labels)
    for cls in sorted(by_class):
        cls_groups = sorted(by_class[cls])
        rng.shuffle(cls_groups)
        # Big groups first so the small ones can even out the counts afterwards.
        cls_groups.sort(key=lambda g: len(members[g]), reverse=True)
        targets = _targets(sum(len(members[g]) for g in cls_groups), ratios)
        counts = [0] * len(splits)
        for g in cls_groups:
            deficits = [(targets[k] - counts[k]) / max(targets[k], 1e-9) if targets[k] else -1e9
                        for k in range(len(splits))]
            k = max(range(len(splits)), key=lambda j: (deficits[j], -j))
            counts[k] += len(members[g])
            for i in members[g]:
                result[i] = splits[k]
    return result

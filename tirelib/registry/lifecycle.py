"""The life cycle of the registered model ``settings.model_name``::

    register_run  a run whose test metrics meet the floors (Thresholds) becomes a version
    stage         alias ``staging`` -> the best version by a metric's test tag (best_version)
    compare       candidate vs the ``production`` model, both scored on the candidate's test split
    judge         the same verdict on metrics measured already (the pipeline's evaluate task)
    produce       alias ``production`` -> the staging version, on a comparison that passed
    rollback      alias ``production`` -> the version it replaced, in one step
    info, history what serves now, and every promotion so far

One promotion path. The comparison is made once, before any lock: :func:`compare` scores the
candidate and the champion (or the pipeline's ``evaluate`` task did, and :func:`judge` turns its
numbers into a :class:`Comparison`). :func:`produce` then promotes on it as a compare-and-set: the
model is loaded once to prove it serves, the model's lock is taken, ``production`` is read again,
and if it is no longer the version the comparison was made against (``champion_version``) the
promotion is refused with :class:`PromotionConflictError`: stale evidence is never applied. The
lock is never held while a model is scored or loaded; it covers a few tag reads and writes.

Consistency. Every alias move happens under the model's lock (:mod:`tirelib.registry.locks`). A
promotion writes in this order, so an interruption at any point leaves a registry that says what
happened:

1. tags on the new version (``promoted_at``, ``promoted_by``, ``previous_production_version``)
2. the history event (a ``tirelib.history.<seq>`` tag of the registered model)
3. the ``production`` alias: the commit point
4. ``archived`` tags on the version it replaced

Before 3, production is untouched and the event reads as not applied (``applied`` is derived:
an event took effect when the next event's ``previous`` names its version, or, for the last one,
when ``production`` does). After 3, a missing step 4 is completed by the next operation under the
lock. The ``production`` alias therefore only ever points at a version whose tags are complete.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from mlflow.entities.model_registry import ModelVersion

from tirelib.config import Thresholds
from tirelib.errors import ConfigurationError, PromotionConflictError, RegistryError
from tirelib.evaluate import MODEL_URI_TAG, Evaluation, evaluate_model
from tirelib.metrics import canonical_metric
from tirelib.registry.client import RegistryClient, now, who
from tirelib.registry.gate import best_version, check, decide, finite
from tirelib.registry.history import ARCHIVE_TAGS, PREVIOUS_TAG, HistoryEvent
from tirelib.registry.locks import model_lock
from tirelib.registry.results import (
    METRIC_TAGS,
    PRODUCTION,
    STAGING,
    Action,
    Comparison,
    Promotion,
    Registration,
    RegistryInfo,
    Staging,
    VersionInfo,
)
from tirelib.settings import Settings

log = logging.getLogger(__name__)


def register_run(
    settings: Settings, run_id: str, *, thresholds: Thresholds | None = None
) -> Registration:
    """Make the run's logged model a version of ``settings.model_name`` if it meets the floors.

    The run's own ``test_*`` metrics are judged. A run registered before returns its existing
    version (looked up by run id, under the model's lock), so a retried task adds no duplicate.
    The version carries tags: dataset_version, model_type, source_run_id and the test metrics.
    """
    thresholds = thresholds or Thresholds()
    registry = RegistryClient(settings)
    with registry.errors(f"registering run {run_id}"):
        run = registry.run(run_id)
        model_uri = run.data.tags.get(MODEL_URI_TAG)
        if not model_uri:
            raise RegistryError(
                f"run {run_id} has no logged model (tag {MODEL_URI_TAG} is missing); "
                "only runs made by `tirelib train` can be registered"
            )
        metrics = {k: float(v) for k, v in run.data.metrics.items() if k in METRIC_TAGS}
        dataset_version = run.data.tags.get("dataset_version") or run.data.params.get(
            "dataset_version"
        )
        model_type = run.data.tags.get("model_type") or run.data.params.get("model_type")

        def result(version: ModelVersion | None, created: bool, reasons: list[str]) -> Registration:
            return Registration(
                model_name=registry.name,
                run_id=run_id,
                registered=version is not None,
                version=version.version if version is not None else None,
                created=created,
                dataset_version=dataset_version,
                model_type=model_type,
                metrics=metrics,
                thresholds=thresholds.describe(),
                reasons=reasons,
            )

        existing = registry.version_for_run(run_id)
        if existing is not None:
            log.info("run %s is already version %s", run_id, existing.version)
            return result(existing, False, [])
        reasons = check(thresholds, metrics)
        if reasons:
            log.warning("run %s misses the thresholds: %s", run_id, "; ".join(reasons))
            return result(None, False, reasons)
        tags = {
            "dataset_version": dataset_version or "",
            "model_type": model_type or "",
            "source_run_id": run_id,
            "registration_gate": thresholds.describe(),
            "registered_at": now(),
            "registered_by": who(),
            **{name: repr(value) for name, value in metrics.items()},
        }
        if commit := run.data.tags.get("git_commit"):
            tags["git_commit"] = commit
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
        with model_lock(settings):
            existing = registry.version_for_run(run_id)  # a concurrent retry may have won
            if existing is not None:
                return result(existing, False, [])
            registry.ensure_model()
            # Tags go in with the version in one request: a version never lacks them.
            version = registry.client.create_model_version(
                registry.name,
                source=model_uri,
                run_id=run_id,
                tags=tags,
                run_link=registry.run_link(run_id, run.info.experiment_id),
                model_id=model_id if model_id and "/" not in model_id else None,
            )
        log.info("registered run %s as version %s of %s", run_id, version.version, registry.name)
        return result(version, True, [])


def judge(
    *,
    model_name: str,
    dataset_version: str,
    candidate_version: str,
    candidate_metrics: Mapping[str, float],
    champion_version: str | None,
    champion_metrics: Mapping[str, float] | None,
    metric: str = "f1",
    thresholds: Thresholds | None = None,
) -> Comparison:
    """The gate's verdict on metrics already measured on ``dataset_version``'s test split.

    Nothing is scored: the caller measured both models on the same images (the pipeline's
    ``evaluate`` task, or :func:`compare`). ``champion_version`` is the production version the
    champion's metrics belong to (``None``: there was none); :func:`produce` applies the result
    only while production is still that version.
    """
    thresholds = thresholds or Thresholds()
    name = canonical_metric(metric)
    if (champion_version is None) != (champion_metrics is None):
        raise ConfigurationError(
            "a comparison needs both the champion's version and its metrics, or neither "
            f"(got version {champion_version!r}, metrics {'given' if champion_metrics else None})"
        )
    mine = {k: float(v) for k, v in candidate_metrics.items() if finite(v) is not None}
    theirs = (
        {k: float(v) for k, v in champion_metrics.items() if finite(v) is not None}
        if champion_metrics is not None
        else None
    )
    decision = decide(mine, theirs, metric=name, thresholds=thresholds)
    key = f"test_{name}"
    return Comparison(
        model_name=model_name,
        metric=name,
        dataset_version=dataset_version,
        candidate_version=str(candidate_version),
        champion_version=str(champion_version) if champion_version is not None else None,
        candidate_score=mine.get(key),
        champion_score=theirs.get(key) if theirs is not None else None,
        margin=thresholds.margin,
        meets_thresholds=decision.meets_thresholds,
        beats_champion=decision.beats_champion,
        reasons=list(decision.reasons),
        candidate_metrics=mine,
        champion_metrics=theirs,
    )


def compare(
    settings: Settings,
    candidate: str | int,
    *,
    metric: str = "f1",
    thresholds: Thresholds | None = None,
    progress: bool | None = None,
) -> Comparison:
    """Score ``candidate`` and the production model on the candidate's test split; judge it.

    Both go through :func:`tirelib.evaluate.evaluate_model` on the same images, with no lock
    held. With no production model the candidate only has to meet the floors. The result
    records the production version it was made against, for :func:`produce`.
    """
    registry = RegistryClient(settings)
    with registry.errors(f"comparing version {candidate}"):
        version = registry.version(str(candidate))
        champion = registry.aliases().get(PRODUCTION)
        return _compare(registry, version, champion, metric, thresholds or Thresholds(), progress)


def _compare(
    registry: RegistryClient,
    version: ModelVersion,
    champion: str | None,
    metric: str,
    thresholds: Thresholds,
    progress: bool | None,
) -> Comparison:
    dataset_version = version.tags.get("dataset_version")
    if not dataset_version:
        raise RegistryError(
            f"version {version.version} of {registry.name!r} has no dataset_version tag, so "
            "there is no test split to compare on; register runs with `tirelib registry register`"
        )

    def score(v: str) -> Evaluation:
        uri = f"models:/{registry.name}/{v}"
        log.info("scoring %s on the test split of %s", uri, dataset_version)
        return evaluate_model(uri, dataset_version, registry.settings, progress=progress)

    mine = score(version.version).flat()
    theirs: dict[str, float] | None = None
    if champion is not None:
        theirs = mine if champion == version.version else score(champion).flat()
    return judge(
        model_name=registry.name,
        dataset_version=dataset_version,
        candidate_version=version.version,
        candidate_metrics=mine,
        champion_version=champion,
        champion_metrics=theirs,
        metric=metric,
        thresholds=thresholds,
    )


def stage(
    settings: Settings,
    *,
    metric: str = "f1",
    version: str | int | None = None,
    dataset_version: str | None = None,
) -> Staging:
    """Point ``staging`` at the best version by its ``test_<metric>`` tag (or at ``version``).

    Archived versions (ones that left production) are not candidates; ``dataset_version``
    narrows the choice to the versions trained on it. :func:`best_version` chooses: ties go to
    the newest version, a version without the metric is never chosen.
    """
    name = canonical_metric(metric)
    key = f"test_{name}"
    registry = RegistryClient(settings)
    with registry.errors("staging a version"), model_lock(settings):
        previous = registry.aliases().get(STAGING)
        scores: dict[str, float] = {}
        if version is not None:
            chosen = registry.version(str(version))
        else:
            candidates = {
                v.version: v
                for v in registry.versions()
                if "archived" not in v.tags
                and (dataset_version is None or v.tags.get("dataset_version") == dataset_version)
            }
            scores = {
                number: score
                for number, v in candidates.items()
                if (score := finite(v.tags.get(key))) is not None
            }
            best = best_version({n: v.tags for n, v in candidates.items()}, name)
            if best is None:
                where = f" trained on {dataset_version!r}" if dataset_version else ""
                raise RegistryError(
                    f"model {registry.name!r} has no unarchived version{where} with a {key} tag "
                    "to stage; register a run first (`tirelib registry register --run-id ...`)"
                )
            chosen = candidates[best]
        if previous != chosen.version:
            # Tags first, alias last: the alias never points at a version without them.
            registry.set_tags(
                chosen.version, {"staged_at": now(), "staged_by": who(), "staging_metric": name}
            )
            registry.move_alias(STAGING, chosen.version)
        return Staging(
            model_name=registry.name,
            metric=name,
            version=chosen.version,
            score=finite(chosen.tags.get(key)),
            previous=previous,
            scores=scores,
            run_id=chosen.run_id,
        )


def produce(
    settings: Settings,
    *,
    comparison: Comparison | None = None,
    metric: str = "f1",
    force: bool = False,
    version: str | int | None = None,
    thresholds: Thresholds | None = None,
    by: str | None = None,
    progress: bool | None = None,
) -> Promotion:
    """Promote a version to ``production`` on a comparison that passed the gate.

    With ``comparison`` (from :func:`compare` or :func:`judge`), its candidate is promoted if
    it passed; nothing is scored again. Without one, the ``staging`` version (or ``version``)
    is compared first, outside any lock. Either way the promotion is a compare-and-set: under
    the model's lock ``production`` must still be the comparison's ``champion_version``, else
    :class:`PromotionConflictError`. ``force`` skips the gate, never the check that the model
    loads. The replaced version is tagged ``archived``; the new one records it as
    ``previous_production_version``, so :func:`rollback` is one step.
    """
    registry = RegistryClient(settings)
    if comparison is not None:
        if force:
            raise ConfigurationError("pass a comparison or force, not both: force skips the gate")
        if comparison.model_name != registry.name:
            raise ConfigurationError(
                f"the comparison is of model {comparison.model_name!r}, not {registry.name!r}"
            )
        if version is not None and str(version) != comparison.candidate_version:
            raise ConfigurationError(
                f"version {version} is not the candidate of the comparison "
                f"({comparison.candidate_version})"
            )
        version = comparison.candidate_version
    name = comparison.metric if comparison is not None else canonical_metric(metric)
    action: Action = "force" if force else "promote"
    with registry.errors("promoting a version"):
        aliases = registry.aliases()
        candidate = str(version) if version is not None else aliases.get(STAGING)
        if candidate is None:
            raise RegistryError(
                f"model {registry.name!r} has no {STAGING!r} version to promote; run "
                "`tirelib registry stage --metric ...` first, or pass --version"
            )
        chosen = registry.version(candidate)
        if aliases.get(PRODUCTION) == chosen.version:
            return _already(registry.name, action, chosen.version, name)
        if not force:
            if comparison is None:  # scored here, before the lock
                comparison = _compare(
                    registry,
                    chosen,
                    aliases.get(PRODUCTION),
                    name,
                    thresholds or Thresholds(),
                    progress,
                )
            if not comparison.passed:
                log.warning("metric drop: %s", comparison.describe())
                return Promotion(
                    registry.name, action, chosen.version, comparison.champion_version, False,
                    "; ".join(comparison.reasons), metric=name, comparison=comparison,
                )  # fmt: skip
        registry.check_loadable(chosen.version)  # before the lock: loading takes a while
        with model_lock(settings):
            model = registry.registered_model()
            current = dict(model.aliases).get(PRODUCTION) if model is not None else None
            if current == chosen.version:
                return _already(registry.name, action, chosen.version, name)
            if comparison is not None and current != comparison.champion_version:
                raise _conflict(registry.name, comparison, current, registry.events(model))
            events = registry.events(model)
            registry.finish_interrupted(events)
            return _promote(registry, chosen, current, events, action, name, comparison, by)


def _already(model_name: str, action: Action, version: str, metric: str) -> Promotion:
    return Promotion(
        model_name, action, version, version, False, "it is already the production version",
        metric=metric,
    )  # fmt: skip


def _conflict(
    model_name: str,
    comparison: Comparison,
    current: str | None,
    events: Sequence[HistoryEvent],
) -> PromotionConflictError:
    moved = next((e for e in reversed(events) if e.applied and e.version == current), None)
    now_serving = f"version {current}" if current is not None else "no version"
    how = f" ({moved.action} by {moved.by} at {moved.at})" if moved is not None else ""
    was = (
        f"production version {comparison.champion_version}"
        if comparison.champion_version is not None
        else "no production version"
    )
    return PromotionConflictError(
        f"refusing to promote version {comparison.candidate_version} of {model_name!r}: "
        f"production is now {now_serving}{how}, but the comparison was made against {was}. "
        "Its evidence is stale: compare again (`tirelib registry compare --candidate "
        f"{comparison.candidate_version}`, or clear the pipeline run's evaluate task) and "
        "promote on the new comparison."
    )


def rollback(
    settings: Settings, *, by: str | None = None, expected: str | None = None
) -> Promotion:
    """Move ``production`` back to the version it replaced, in one step.

    The version rolled back from is tagged ``archived`` and ``rolled_back``. The restored one
    keeps its own ``previous_production_version``, so a second rollback goes one further back.
    The restored model is loaded before the lock; under it, production must not have moved.
    ``expected`` is the production version the caller judged (monitoring: the version whose
    live accuracy is low): if production is no longer that version, under the lock as before
    it, the rollback is refused with :class:`PromotionConflictError`, so a version is never
    rolled back on another version's evidence.
    """
    registry = RegistryClient(settings)
    with registry.errors("rolling back"):
        current = registry.aliases().get(PRODUCTION)
        if current is None:
            raise RegistryError(f"model {registry.name!r} has no {PRODUCTION!r} version")
        if expected is not None and current != str(expected):
            raise _not_expected(registry.name, str(expected), current)
        target = registry.version(current).tags.get(PREVIOUS_TAG)
        if not target:
            raise RegistryError(
                f"production version {current} of {registry.name!r} records no previous "
                "production version: there is nothing to roll back to"
            )
        chosen = registry.version(target)
        registry.check_loadable(chosen.version)
        with model_lock(settings):
            model = registry.registered_model()
            now_serving = dict(model.aliases).get(PRODUCTION) if model is not None else None
            if expected is not None and now_serving != str(expected):
                raise _not_expected(registry.name, str(expected), now_serving)
            if now_serving != current:
                raise PromotionConflictError(
                    f"production of {registry.name!r} moved from version {current} to "
                    f"{now_serving} while rolling back; run `tirelib registry info` and roll "
                    "back again if that is still wanted"
                )
            events = registry.events(model)
            registry.finish_interrupted(events)
            return _promote(registry, chosen, current, events, "rollback", None, None, by)


def _not_expected(model_name: str, expected: str, current: str | None) -> PromotionConflictError:
    now_serving = f"version {current}" if current is not None else "no version"
    return PromotionConflictError(
        f"refusing to roll back version {expected} of {model_name!r}: production is now "
        f"{now_serving}, and what was judged was version {expected}; run `tirelib registry "
        "info` and roll back again if that is still wanted"
    )


def _promote(
    registry: RegistryClient,
    chosen: ModelVersion,
    previous: str | None,
    events: Sequence[HistoryEvent],
    action: Action,
    metric: str | None,
    comparison: Comparison | None,
    by: str | None,
) -> Promotion:
    """Move ``production`` to ``chosen`` in the documented order (see the module docstring).

    Called under the model's lock, with ``previous`` read under it.
    """
    version = chosen.version
    at, by = now(), by or who()
    # 1. the new version's tags
    tags = {"promoted_at": at, "promoted_by": by, "promotion_action": action}
    if metric is not None:
        tags["promotion_metric"] = metric
    if action != "rollback":  # a restored version keeps its own predecessor
        if previous is not None:
            tags[PREVIOUS_TAG] = previous
        else:
            registry.delete_tags(chosen, [PREVIOUS_TAG])  # left by an interrupted attempt
    registry.set_tags(version, tags)
    registry.delete_tags(chosen, ARCHIVE_TAGS)
    # 2. the history event
    event = {
        "action": action,
        "version": version,
        "previous": previous,
        "at": at,
        "by": by,
        "metric": metric,
        "score": comparison.candidate_score if comparison else None,
        "champion_score": comparison.champion_score if comparison else None,
    }
    registry.append_event(events, event)
    # 3. the alias: the commit point
    registry.move_alias(PRODUCTION, version)
    # 4. the replaced version
    if previous is not None:
        registry.archive(previous, replaced_by=version, rolled_back=action == "rollback")
    reason = {
        "promote": comparison.describe() if comparison else "passed the gate",
        "force": "forced (gate skipped)",
        "rollback": f"rolled back from version {previous}",
    }[action]
    log.info("%s of %s -> version %s (%s)", PRODUCTION, registry.name, version, action)
    return Promotion(
        registry.name, action, version, previous, True, reason,
        metric=metric, comparison=comparison, at=at, by=by,
    )  # fmt: skip


def info(settings: Settings) -> RegistryInfo:
    """The production and staging versions: type, data, metrics, run link and model URIs."""
    registry = RegistryClient(settings)
    with registry.errors("reading the registry"):
        model = registry.registered_model()
        if model is None:
            return RegistryInfo(registry.name, registry.where, False, None, None)
        by_version: dict[str, list[str]] = {}
        for alias, version in model.aliases.items():
            by_version.setdefault(version, []).append(alias)

        def describe(version: str | None) -> VersionInfo | None:
            if version is None:
                return None
            mv = registry.version(version)
            return VersionInfo(
                version=mv.version,
                aliases=sorted(by_version.get(mv.version, [])),
                model_type=mv.tags.get("model_type"),
                dataset_version=mv.tags.get("dataset_version"),
                metrics={
                    key: value
                    for key in METRIC_TAGS
                    if (value := finite(mv.tags.get(key))) is not None
                },
                run_id=mv.run_id,
                run_link=registry.run_link(mv.run_id),
                model_uri=f"models:/{registry.name}/{mv.version}",
                source=mv.source,
                artifact_uri=registry.client.get_model_version_download_uri(
                    registry.name, mv.version
                ),
                tags=dict(mv.tags),
            )

        return RegistryInfo(
            model_name=registry.name,
            tracking_uri=registry.where,
            exists=True,
            production=describe(model.aliases.get(PRODUCTION)),
            staging=describe(model.aliases.get(STAGING)),
            version_count=len(registry.versions()),
        )


def history(settings: Settings, *, limit: int | None = None) -> list[HistoryEvent]:
    """Promotions and rollbacks, newest first; ``applied`` is false for interrupted ones."""
    registry = RegistryClient(settings)
    with registry.errors("reading the promotion history"):
        events = registry.events()
    newest = list(reversed(events))
    return newest[:limit] if limit is not None else newest


__all__ = [
    "best_version",
    "compare",
    "history",
    "info",
    "judge",
    "produce",
    "register_run",
    "rollback",
    "stage",
]

"""The Apache Beam drivers of ingestion (``--runner``): the same units as the local process pool, written by a
Beam pipeline (``clipjax[beam]``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from clipjax.data.ingest.plan import IngestError
from clipjax.data.ingest.units import ingest_unit, list_unit




def _beam():
    """The ``apache_beam`` module, imported only for ``--runner``."""
    try:
        import apache_beam
    except ImportError:
        raise IngestError('--runner needs Apache Beam: pip install "clipjax[beam]"') from None
    return apache_beam


def _pipeline(runner: str, pipeline_args: Sequence[str]):
    """(the apache_beam module, a Pipeline on `runner` with the options `pipeline_args`), for ``with pipeline:``."""
    beam = _beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    return beam, beam.Pipeline(options=PipelineOptions(list(pipeline_args), runner=runner))


def run_beam(tasks: Sequence[UnitTask], runner: str, pipeline_args: Sequence[str] = ()) -> None:
    """The Beam driver: a pipeline ``Create(tasks) | Reshuffle | Map(ingest_unit)`` run to completion on ``runner``
    with the options ``pipeline_args`` (``--project=...``, ``--region=...``, ...: Beam's PipelineOptions). The
    reports are read back from the output afterwards, as for the local driver."""
    if not tasks:
        return
    beam, pipeline = _pipeline(runner, pipeline_args)
    with pipeline:
        _ = (pipeline
             | "units" >> beam.Create(list(tasks), reshuffle=False)
             | "spread over workers" >> beam.Reshuffle()
             | "ingest_unit" >> beam.Map(ingest_unit))


def _key_and_tar(listed: tuple[int, list[str]]) -> Iterator[tuple[str, int]]:
    index, keys = listed
    return ((key, index) for key in keys)


def _later_tars(key_tars: tuple[str, Iterable[int]]) -> Iterator[tuple[int, str]]:
    """(tar index, key) for every tar holding `key` but the first in listing order."""
    key, tars = key_tars
    return ((index, key) for index in sorted(set(tars))[1:])


def _write_unit(joined: tuple[int, dict]) -> dict | None:
    """``ingest_unit`` of a pending unit with the keys to drop that the pipeline found for its tar."""
    _, parts = joined
    units = list(parts["unit"])
    return ingest_unit(dataclasses.replace(units[0], drop=list(parts["drop"]))) if units else None


def run_beam_tars(listing: Sequence[ListTask], pending: dict[int, UnitTask], runner: str,
                  pipeline_args: Sequence[str] = ()) -> None:
    """The Beam driver for a source planned on the workers (``plan_tars``): a pipeline

        Create(listing) | Reshuffle | Map(list_unit)                  (tar index, its keys), every tar
          | FlatMap (key, tar index) | GroupByKey | FlatMap _later_tars   (tar index, key) to drop: duplicates
        {Create(pending units), drops} | CoGroupByKey | Map(_write_unit)   the pending units written

    so the keys are grouped by the runner's shuffle, never gathered on one machine."""
    if not pending:
        return
    beam, pipeline = _pipeline(runner, pipeline_args)
    with pipeline:
        drops = (pipeline
                 | "tars" >> beam.Create(list(listing), reshuffle=False)
                 | "spread tars over workers" >> beam.Reshuffle()
                 | "list_unit" >> beam.Map(list_unit)
                 | "key, tar" >> beam.FlatMap(_key_and_tar)
                 | "tars by key" >> beam.GroupByKey()
                 | "duplicates" >> beam.FlatMap(_later_tars))
        units = pipeline | "units" >> beam.Create(sorted(pending.items()), reshuffle=False)
        _ = ({"unit": units, "drop": drops}
             | "drops by unit" >> beam.CoGroupByKey()
             | "ingest_unit" >> beam.Map(_write_unit))

"""The definition registry across a restart: a checkpoint's definitions keep their origin, the
directory as it is now wins for its own, the metadata service's stand in until it answers."""

from __future__ import annotations

from typing import Any

from analytics_engine.calculation.registry import (
    DefinitionRegistry,
    directory_definition,
    restored_origin,
    split_by_origin,
    versioned,
)
from analytics_engine.kpi import KPIDefinition, VersionedKPIDefinition


def big_orders(**over: Any) -> KPIDefinition:
    data = {
        "code": "big_orders",
        "display_name": "Big orders",
        "entity_type": "order",
        "aggregation": "count",
        "filter": "amount > 100",
        "window": {"type": "tumbling", "size": "1m"},
        **over,
    }
    return KPIDefinition.model_validate(data)


def from_metadata(version: int, **over: Any) -> VersionedKPIDefinition:
    return versioned(big_orders(**over), version)


EDITED = {"filter": "amount > 500"}


def test_an_edited_directory_definition_wins_over_the_checkpoints() -> None:
    """The reviewer's case: the file was edited while the engine was down, and no metadata
    service runs. The old code kept running the checkpoint's filter as a 'metadata'
    definition until the checkpoint was deleted."""
    registry = DefinitionRegistry([big_orders(**EDITED)])
    registry.restore([versioned(big_orders())], {"big_orders": "directory"})
    running = registry.effective()["big_orders"]
    assert running.filter == "amount > 500"
    assert running.version == 1  # a definition change: the next version
    assert registry.source_of("big_orders") == "directory"
    assert registry.origins() == {"big_orders": "directory"}


def test_a_definition_deleted_from_the_directory_stops() -> None:
    registry = DefinitionRegistry([])
    registry.restore([versioned(big_orders())], {"big_orders": "directory"})
    assert registry.effective() == {}


def test_an_unchanged_directory_definition_keeps_the_checkpoints_version() -> None:
    """Equal to what ran: no redefinition (its windows carry on), whatever version it ran as."""
    checkpointed = versioned(big_orders(), 3)
    registry = DefinitionRegistry([big_orders()])
    registry.restore([checkpointed], {"big_orders": "directory"})
    assert registry.effective()["big_orders"] == checkpointed


def test_metadata_definitions_stand_in_until_the_metadata_service_answers() -> None:
    """Over the directory's definition of the same code too: the metadata service wins there."""
    checkpointed = from_metadata(4, filter="amount > 42")
    registry = DefinitionRegistry([big_orders(**EDITED)])
    registry.restore([checkpointed], {"big_orders": "metadata"})
    assert registry.effective()["big_orders"] == checkpointed
    assert registry.source_of("big_orders") == "metadata"
    registry.replace_remote([])  # it answers: the code is not (or no longer) defined there
    assert registry.effective()["big_orders"] == versioned(big_orders(**EDITED))
    assert registry.origins() == {"big_orders": "directory"}


def test_a_metadata_definition_is_not_dropped_for_missing_from_the_directory() -> None:
    checkpointed = from_metadata(2)
    registry = DefinitionRegistry([])
    registry.restore([checkpointed], {"big_orders": "metadata"})
    assert registry.effective() == {"big_orders": checkpointed}


def test_origins_of_a_checkpoint_that_recorded_none_come_from_the_version() -> None:
    """Written before origins were recorded: version 0 only came from the directory then (the
    metadata service numbers versions from 1)."""
    assert restored_origin(versioned(big_orders()), {}) == "directory"
    assert restored_origin(from_metadata(1), {}) == "metadata"
    # a recorded origin is taken as it is; one that is not an origin is inferred
    assert restored_origin(versioned(big_orders()), {"big_orders": "metadata"}) == "metadata"
    assert restored_origin(from_metadata(7), {"big_orders": "directory"}) == "directory"
    assert restored_origin(versioned(big_orders()), {"big_orders": "elsewhere"}) == "directory"
    old = [versioned(big_orders()), from_metadata(3, code="revenue")]
    split = split_by_origin(old, {})
    assert set(split["directory"]) == {"big_orders"} and set(split["metadata"]) == {"revenue"}


def test_a_legacy_checkpoint_restores_by_the_inferred_origins() -> None:
    registry = DefinitionRegistry([big_orders(**EDITED), big_orders(code="revenue")])
    stand_in = from_metadata(3, code="revenue", filter="amount > 1")
    registry.restore([versioned(big_orders()), stand_in], {})
    effective = registry.effective()
    assert (effective["big_orders"].filter, effective["big_orders"].version) == ("amount > 500", 1)
    assert effective["revenue"] == stand_in


def test_every_edit_is_a_new_version_even_back_to_an_earlier_text() -> None:
    first = directory_definition(big_orders(), None)
    assert first == versioned(big_orders())
    second = directory_definition(big_orders(**EDITED), first)
    third = directory_definition(big_orders(), second)
    assert (second.version, third.version) == (1, 2)
    assert third.definition() == big_orders()
    assert directory_definition(big_orders(), third) is third


def test_the_directory_record_numbers_a_code_across_its_absences() -> None:
    """What the checkpoint records of the directory (`directory_record`) keeps a deleted or
    disabled code's version, so its next definition takes the version after it."""
    first = DefinitionRegistry([big_orders(**EDITED)])
    first.restore([], {}, [versioned(big_orders(), 4)])
    assert first.effective()["big_orders"].version == 5
    deleted = DefinitionRegistry([])
    deleted.restore([], {}, first.directory_record())
    assert deleted.effective() == {}
    assert deleted.directory_record() == [versioned(big_orders(**EDITED), 5)]
    recreated = DefinitionRegistry([big_orders(filter="amount > 900")])
    recreated.restore([], {}, deleted.directory_record())
    assert recreated.effective()["big_orders"].version == 6
    disabled = DefinitionRegistry([big_orders(filter="amount > 900", enabled=False)])
    disabled.restore([], {}, recreated.directory_record())  # not running: absent from `[]`
    assert disabled.effective()["big_orders"].version == 7

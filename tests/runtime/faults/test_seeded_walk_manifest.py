"""The seeded walk's settings in a manifest (index.seed_step, index.ef_seeded) as untrusted input."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_runtime.bundle import MANIFEST, Bundle, BundleError, content_id


def _edit_index(bundle_dir: Path, **values) -> None:
    m = yaml.safe_load((bundle_dir / MANIFEST).read_text())
    for k, v in values.items():
        if v is None:
            m["index"].pop(k, None)
        else:
            m["index"][k] = v
    m["bundle_id"] = content_id(m)     # an edit made by the exporter's rules, so only the field checks can refuse it
    (bundle_dir / MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))


@pytest.mark.parametrize("values,field", [({"seed_step": 1}, "seed_step"), ({"seed_step": -4}, "seed_step"),
                                          ({"seed_step": True}, "seed_step"), ({"ef_seeded": "4"}, "ef_seeded"),
                                          ({"seed_step": 4, "ef_seeded": 0}, "ef_seeded"),
                                          # wider than faiss's C int (OverflowError at load or on every frame)
                                          ({"ef_search": 2**40}, "ef_search"),
                                          ({"seed_step": 4, "ef_seeded": 2**40}, "ef_seeded"),
                                          ({"ef_search": 4097}, "ef_search")])
def test_an_invalid_seeded_walk_in_the_manifest_is_refused_naming_the_field(bundle_copy, values, field):
    _edit_index(bundle_copy, **values)
    with pytest.raises(BundleError, match=rf"index\.{field}"):
        Bundle.load(bundle_copy, verify=False)


def test_a_bundle_made_before_the_seeded_walk_walks_every_patch_from_the_top(bundle_copy):
    _edit_index(bundle_copy, seed_step=None, ef_seeded=None)
    params = Bundle.load(bundle_copy, verify=False).hnsw_params
    assert params.seed_step == 0 and params.ef_seeded == 0


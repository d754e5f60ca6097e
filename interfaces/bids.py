"""The derivatives sink: copies results to BIDS names with JSON sidecars, atomically."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from qsmprep.bids import atomic_write_text, bids_uri, dataset_links, derivative_path


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    base_directory = traits.Directory(mandatory=True, desc="derivatives dataset root")
    bids_dir = traits.Directory(mandatory=True, desc="raw dataset root (for Sources URIs)")
    mask_dir = traits.Directory(desc="provided masks' dataset (the 'masks' link of Sources)")
    in_file = InputMultiObject(File(exists=True), mandatory=True, desc="files to write")
    source_files = traits.List(traits.Str, desc="raw input files this output derives from")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the outputs (long names)")
    suffix = traits.Str(mandatory=True, desc="BIDS suffix, e.g. Chimap")
    desc = traits.Str(desc="desc entity")
    echo = traits.List(traits.Int, desc="echo entity per input file")
    part = traits.Str(desc="part entity")
    datatype = traits.Str("anat", usedefault=True, desc="BIDS datatype folder")
    metadata = traits.Dict(desc="sidecar fields")
    extra_metadata = traits.List(traits.Dict, desc="step provenance dicts merged into the sidecar")
    file_metadata = traits.List(traits.Dict, desc="sidecar fields specific to each input file")


class _DerivativesDataSinkOutputSpec(TraitedSpec):
    out_file = OutputMultiObject(File(exists=True), desc="written files")


class DerivativesDataSink(SimpleInterface):
    """Write derivatives under BIDS names (temporary file + rename: never half-written)."""

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        echoes = list(inputs.echo) if inputs.echo else [None] * len(inputs.in_file)
        if len(echoes) != len(inputs.in_file):
            raise ValueError(f"{len(inputs.in_file)} files but {len(echoes)} echo labels.")
        metadata = {}
        for extra in inputs.extra_metadata or []:
            metadata.update(extra)
        metadata.update(inputs.metadata or {})
        metadata = {key: value for key, value in metadata.items() if value is not None}
        # a step's own Sources (a provided mask) name what the output came from; else the
        # raw echoes
        sources = metadata.get("Sources") or inputs.source_files
        if sources:
            links = dataset_links(inputs.bids_dir, inputs.mask_dir or None)
            metadata["Sources"] = [bids_uri(p, links) for p in sources]
        per_file = list(inputs.file_metadata) if inputs.file_metadata else [{}] * len(echoes)
        written = []
        for in_file, echo, specific in zip(inputs.in_file, echoes, per_file):
            relative = derivative_path(
                inputs.entities,
                inputs.suffix,
                desc=inputs.desc or None,
                echo=echo,
                part=inputs.part or None,
                datatype=inputs.datatype,
            )
            out_file = Path(inputs.base_directory) / relative
            sidecar = out_file.with_name(out_file.name.split(".")[0] + ".json")
            # sidecar first, image last: an image under its final name is always complete
            # and described (a killed run leaves at most a sidecar or a hidden .tmp file)
            atomic_write_text(sidecar, json.dumps({**metadata, **specific}, indent=2,
                                                  sort_keys=True, default=_jsonable))
            _atomic_copy(in_file, out_file)
            written.append(str(out_file))
        self._results["out_file"] = written
        return runtime


def _gzip(source: str, destination: str) -> None:
    """gzip ``source`` into ``destination`` with reproducible bytes (no name, mtime 0) at
    level 1, as nibabel writes ``.nii.gz``."""
    with open(source, "rb") as raw, open(destination, "wb") as out:
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=1,
                           mtime=0) as packed:
            shutil.copyfileobj(raw, packed, length=16 * 2**20)


def _atomic_copy(source: str, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.",
                                   suffix=".tmp")
    os.close(handle)
    try:
        if destination.name.endswith(".gz") and not str(source).endswith(".gz"):
            _gzip(source, tmp)
        else:
            shutil.copyfile(source, tmp)
        with open(tmp, "rb") as stream:  # on disk before the rename makes it visible
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)

"""Energy and CO₂e accounting of training and benchmarks with codecarbon, offline.

    --report_to codecarbon --energy_country_iso_code BRA
        └─► train_evaluate_save swaps transformers' CodeCarbonCallback (online `EmissionsTracker`, which looks up
            the location on the network) for `OfflineCodeCarbonCallback` (codecarbon's `OfflineEmissionsTracker`:
            the country's carbon intensity from codecarbon's bundled energy-mix data, no network)
        └─► train_energy_kwh / train_emissions_kg_co2e / train_energy_duration_s in all_results.json,
            the full report in <output_dir>/energy.json, and on request in the model card (`ptmoe.cards`)

Power itself is codecarbon's business (we do not re-implement it): with Intel RAPL files readable it measures the
CPU; otherwise it estimates CPU power from the model's TDP (or 4 W per thread for unknown CPUs) scaled by the CPU
load; RAM power comes from a model of the installed memory; GPUs through NVML. `EnergyReport.cpu_power_mode` says
which CPU mode was used, so a reader can tell a measurement from an estimate.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENERGY_INTEGRATION = "codecarbon"
# What codecarbon's CPU modes mean, for reports and cards.
CPU_POWER_MODES = {
    "intel_rapl": "measured (Intel RAPL energy counters)",
    "intel_power_gadget": "measured (Intel Power Gadget)",
    "cpu_load": "estimated: TDP (or 4 W per thread for an unknown CPU) scaled by the CPU load",
    "constant": "estimated: a constant share of the CPU's TDP",
}


@dataclass
class EnergyReport:
    """Energy use of one tracked run, as codecarbon computed it.

    Attributes:
        energy_kwh (`float`): CPU + GPU + RAM energy.
        emissions_kg_co2e (`float`): `energy_kwh` times the carbon intensity of `country_iso_code` (/ `region`).
        duration_s (`float`): wall-clock seconds tracked.
        country_iso_code (`str`), region (`str` or `None`): where the energy was used (given, not looked up).
        cpu_power_mode (`str`): codecarbon's CPU mode (see `CPU_POWER_MODES`); cpu_model (`str`).
        cpu_power_w (`float`), ram_power_w (`float`), gpu_power_w (`float`): mean power over the run.
        codecarbon_version (`str`).
    """

    energy_kwh: float
    emissions_kg_co2e: float
    duration_s: float
    country_iso_code: str
    region: str | None
    cpu_power_mode: str
    cpu_model: str
    cpu_power_w: float
    ram_power_w: float
    gpu_power_w: float
    codecarbon_version: str

    def metrics(self, prefix: str = "train") -> dict[str, float]:
        """The three numbers for a Trainer metrics dict: `<prefix>_energy_kwh`, `_emissions_kg_co2e`, `_energy_duration_s`."""
        return {
            f"{prefix}_energy_kwh": self.energy_kwh,
            f"{prefix}_emissions_kg_co2e": self.emissions_kg_co2e,
            f"{prefix}_energy_duration_s": self.duration_s,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "cpu_power_mode_meaning": CPU_POWER_MODES.get(self.cpu_power_mode, "see codecarbon"),
        }

    def markdown(self) -> str:
        """One paragraph for a model card's training section."""
        where = self.country_iso_code + (f" ({self.region})" if self.region else "")
        meaning = CPU_POWER_MODES.get(self.cpu_power_mode, self.cpu_power_mode)
        return (
            f"**Energy and emissions.** {self.energy_kwh:.4g} kWh and {self.emissions_kg_co2e:.4g} kg CO₂e over "
            f"{self.duration_s:.0f} s of training, computed by codecarbon {self.codecarbon_version} "
            f"(`OfflineEmissionsTracker`, grid carbon intensity of {where}); CPU power {meaning} "
            f"({self.cpu_model}, mean {self.cpu_power_w:.3g} W), RAM {self.ram_power_w:.3g} W, GPU "
            f"{self.gpu_power_w:.3g} W."
        )


def load_energy_report(path: str | Path) -> EnergyReport:
    """Read an `energy.json` written by `write_energy_report`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    data.pop("cpu_power_mode_meaning", None)
    return EnergyReport(**data)


def write_energy_report(report: EnergyReport, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def check_codecarbon(
    country_iso_code: str | None, region: str | None = None, flag: str = "--report_to"
) -> str:
    """Validate an offline codecarbon set-up before any work starts; returns the upper-case country code.

    Raises:
        ImportError: codecarbon is not installed.
        ValueError: no country, or one codecarbon has no carbon-intensity data for (it would otherwise fall back
            silently to a world average), or a region it does not know for that country.
    """
    if importlib.util.find_spec("codecarbon") is None:
        raise ImportError(
            f"{flag} codecarbon needs the codecarbon package, which is not installed: `pip install codecarbon`"
        )
    if not country_iso_code:
        raise ValueError(
            f"{flag} codecarbon runs offline here (no location lookup on the network): give the country whose grid "
            "powers this machine with --energy_country_iso_code (ISO 3166-1 alpha-3, e.g. BRA, PRT, USA)"
        )
    from codecarbon.input import DataSource

    code = country_iso_code.upper()
    source = DataSource()
    if code not in source.get_global_energy_mix_data():
        raise ValueError(
            f"--energy_country_iso_code {country_iso_code!r} is not a country codecarbon has carbon-intensity data "
            "for; use an ISO 3166-1 alpha-3 code such as BRA, PRT or USA"
        )
    if region is not None:
        try:
            regions = source.get_country_emissions_data(code.lower())
        except Exception:  # noqa: BLE001 - codecarbon raises several types for countries without regional data
            regions = None
        if not regions or region.lower() not in regions:
            known = f"; known regions: {', '.join(sorted(regions)[:8])}, ..." if regions else ""
            raise ValueError(
                f"--energy_region {region!r} is not a region codecarbon knows for {code} (regional data exists "
                f"for a few countries, e.g. USA and CAN){known}"
            )
    return code


class EnergyTracker:
    """Start/stop wrapper around codecarbon's `OfflineEmissionsTracker` returning an `EnergyReport`.

    Usable as a context manager (`with EnergyTracker("BRA") as tracker: ...; tracker.report`).

    Args:
        country_iso_code (`str`): ISO 3166-1 alpha-3 code of the country whose grid powers the machine.
        region (`str`, *optional*): a region codecarbon has data for (e.g. a US state).
        measure_power_secs (`float`, defaults to 15): codecarbon's sampling interval (it also samples at stop).
    """

    def __init__(
        self, country_iso_code: str | None, region: str | None = None, measure_power_secs: float = 15
    ):
        self.country_iso_code = check_codecarbon(country_iso_code, region)
        self.region = region.lower() if region else None
        self.measure_power_secs = measure_power_secs
        self.report: EnergyReport | None = None
        self._tracker = None

    def start(self) -> None:
        import codecarbon

        kwargs = {"region": self.region} if self.region else {}
        self._tracker = codecarbon.OfflineEmissionsTracker(
            country_iso_code=self.country_iso_code,
            measure_power_secs=self.measure_power_secs,
            save_to_file=False,
            log_level="warning",
            **kwargs,
        )
        self._tracker.start()

    def stop(self) -> EnergyReport:
        """Stop tracking and build the report.

        Raises:
            RuntimeError: codecarbon found no way to measure or estimate power here (no energy figure).
        """
        import codecarbon

        if self._tracker is None:
            raise RuntimeError("EnergyTracker.stop() called before start()")
        tracker, self._tracker = self._tracker, None
        tracker.stop()
        data = getattr(tracker, "final_emissions_data", None)
        energy = getattr(data, "energy_consumed", None)
        hardware = getattr(tracker, "_hardware", [])
        if data is None or energy is None or not math.isfinite(energy) or not hardware:
            raise RuntimeError(
                "codecarbon could not measure or estimate the energy of this run (no CPU, GPU or RAM power source "
                "was found): the energy report needs codecarbon's RAPL, TDP or constant CPU modes, or NVML for GPUs. "
                "Remove `codecarbon` from --report_to to train without it."
            )
        cpu = next((h for h in hardware if type(h).__name__ == "CPU"), None)
        self.report = EnergyReport(
            energy_kwh=float(energy),
            emissions_kg_co2e=float(data.emissions),
            duration_s=float(data.duration),
            country_iso_code=self.country_iso_code,
            region=self.region,
            cpu_power_mode=str(getattr(cpu, "_mode", "none")),
            cpu_model=str(getattr(data, "cpu_model", "") or getattr(cpu, "_model", "unknown")),
            cpu_power_w=float(data.cpu_power or 0.0),
            ram_power_w=float(data.ram_power or 0.0),
            gpu_power_w=float(data.gpu_power or 0.0),
            codecarbon_version=codecarbon.__version__,
        )
        return self.report

    def __enter__(self) -> EnergyTracker:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if exc_info[0] is None:
            self.stop()
        elif self._tracker is not None:  # the body failed: stop codecarbon's thread, keep the original error
            self._tracker.stop()
            self._tracker = None


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class OfflineCodeCarbonCallback(_callback_base()):
    """Track the energy of `Trainer.train()` offline (main process of each machine only), like transformers'
    `CodeCarbonCallback` but with a given country instead of a network location lookup. `report` after training."""

    def __init__(self, country_iso_code: str | None, region: str | None = None):
        self.tracker = EnergyTracker(country_iso_code, region)
        self.report: EnergyReport | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_local_process_zero:
            self.tracker.start()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_local_process_zero:
            self.report = self.tracker.stop()


def use_offline_codecarbon(trainer, country_iso_code: str | None, region: str | None = None):
    """With `codecarbon` in `trainer.args.report_to`, swap transformers' online callback for the offline one.

    Returns the `OfflineCodeCarbonCallback` (None when codecarbon is not requested). transformers' callback only
    built an `EmissionsTracker` (no network until it starts); it is removed before training starts.
    """
    if ENERGY_INTEGRATION not in (trainer.args.report_to or []):
        return None
    from transformers.integrations import CodeCarbonCallback

    callback = OfflineCodeCarbonCallback(country_iso_code, region)
    trainer.remove_callback(CodeCarbonCallback)
    trainer.add_callback(callback)
    return callback


# --------------------------------------------------------------------------------------------------------------
# Benchmarks (plain argparse scripts): the same offline tracker around the whole run
# --------------------------------------------------------------------------------------------------------------
def add_energy_arguments(parser) -> None:
    """`--report_to {none,codecarbon}`, `--energy_country_iso_code`, `--energy_region` for a benchmark script."""
    parser.add_argument(
        "--report_to",
        choices=["none", ENERGY_INTEGRATION],
        default="none",
        help="codecarbon: energy/CO2e (offline)",
    )
    parser.add_argument(
        "--energy_country_iso_code", help="with --report_to codecarbon: e.g. BRA (ISO alpha-3)"
    )
    parser.add_argument("--energy_region", help="with --report_to codecarbon: a region codecarbon knows")


def start_benchmark_energy(args, parser=None) -> EnergyTracker | None:
    """Start tracking when `args.report_to == "codecarbon"` (bad set-ups end the script via `parser.error`)."""
    if getattr(args, "report_to", "none") != ENERGY_INTEGRATION:
        return None
    try:
        tracker = EnergyTracker(args.energy_country_iso_code, args.energy_region)
    except (ValueError, ImportError) as error:
        if parser is None:
            raise
        parser.error(str(error))
    tracker.start()
    return tracker


def finish_benchmark_energy(tracker: EnergyTracker | None) -> dict[str, Any] | None:
    """Stop the tracker of `start_benchmark_energy`, print one line and return the report as a dict (or None)."""
    if tracker is None:
        return None
    report = tracker.stop()
    print(
        f"energy of this run: {report.energy_kwh:.3g} kWh, {report.emissions_kg_co2e:.3g} kg CO2e over "
        f"{report.duration_s:.0f} s (codecarbon offline, {report.country_iso_code}; CPU power {report.cpu_power_mode})"
    )
    return report.to_dict()


__all__ = [
    "add_energy_arguments",
    "finish_benchmark_energy",
    "start_benchmark_energy",
    "CPU_POWER_MODES",
    "ENERGY_INTEGRATION",
    "EnergyReport",
    "EnergyTracker",
    "OfflineCodeCarbonCallback",
    "check_codecarbon",
    "load_energy_report",
    "use_offline_codecarbon",
    "write_energy_report",
]

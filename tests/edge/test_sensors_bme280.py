"""The BME280 driver: Bosch's compensation and the datasheet's worked example, on an emulated chip.

The worked example (adc_T 519888 -> 25.08 Cel, t_fine 128422; adc_P 415148 -> 100653.27 Pa) is
printed in the BMP280 datasheet (BST-BMP280-DS001, section 3.12), whose temperature and pressure
compensation the BME280 shares word for word. Its table shows 25767236 for the 64-bit integer
code; executing that code gives 25767233 (100653.25 Pa), within the datasheet's own note that the
integer result may differ slightly from the floating-point figures.
"""

from __future__ import annotations

import errno
import struct

import pytest
import smbus2
from hypothesis import given
from hypothesis import strategies as st

from edge.sensors.base import SensorError
from edge.sensors.bme280 import (
    REG_CTRL_HUM,
    REG_CTRL_MEAS,
    BME280Config,
    BME280Driver,
    Calibration,
    I2CBus,
    compensate_humidity,
    compensate_humidity_double,
    compensate_pressure,
    compensate_pressure_double,
    compensate_temperature,
    compensate_temperature_double,
)
from iotpipe.errors import ConfigError
from tests.edge.fixtures import fixed_clock

#: The datasheet's T and P trimming values; H values of a typical chip (no published example).
EXAMPLE = Calibration(
    T1=27504, T2=26435, T3=-1000,
    P1=36477, P2=-10685, P3=3024, P4=2855, P5=140, P6=-7, P7=15500, P8=-14600, P9=6000,
    H1=75, H2=362, H3=0, H4=313, H5=50, H6=30,
)  # fmt: skip
ADC_T, ADC_P = 519888, 415148
ADC_H = 30000


def test_datasheet_temperature() -> None:
    """adc_T 519888 gives 25.08 Cel and t_fine 128422, integer and double alike."""
    assert compensate_temperature(EXAMPLE, ADC_T) == (2508, 128422)
    celsius, t_fine = compensate_temperature_double(EXAMPLE, ADC_T)
    assert t_fine == 128422
    assert celsius == pytest.approx(25.08, abs=0.005)
    # The datasheet's intermediate values: var1 128793.1787, var2 -370.8917052.
    assert celsius * 5120.0 == pytest.approx(128793.1787 - 370.8917052, abs=1e-3)


def test_datasheet_pressure() -> None:
    """adc_P 415148 at t_fine 128422 gives 100653.27 Pa (within 0.05 Pa)."""
    q24_8 = compensate_pressure(EXAMPLE, ADC_P, 128422)
    assert q24_8 == 25767233  # the datasheet prints 25767236: see the module docstring
    assert q24_8 / 256 == pytest.approx(100653.27, abs=0.05)
    assert compensate_pressure_double(EXAMPLE, ADC_P, 128422) == pytest.approx(100653.27, abs=0.05)


def test_pressure_guards_division_by_zero() -> None:
    """A blank P1 gives 0, as the datasheet's guard does, instead of dividing by zero."""
    blank = Calibration(**_replace(P1=0))
    assert compensate_pressure(blank, ADC_P, 128422) == 0
    assert compensate_pressure_double(blank, ADC_P, 128422) == 0.0


def _replace(**changes: int) -> dict[str, int]:
    fields = {name: getattr(EXAMPLE, name) for name in EXAMPLE.__dataclass_fields__}
    return {**fields, **changes}


@given(adc_h=st.integers(0, 0xFFFF), adc_t=st.integers(380_000, 620_000))
def test_humidity_integer_matches_double(adc_h: int, adc_t: int) -> None:
    """The 32-bit humidity code agrees with the double formula to 0.01 %RH, clamped to 0..100."""
    _, t_fine = compensate_temperature(EXAMPLE, adc_t)
    integer = compensate_humidity(EXAMPLE, adc_h, t_fine) / 1024
    assert 0.0 <= integer <= 100.0
    assert integer == pytest.approx(compensate_humidity_double(EXAMPLE, adc_h, t_fine), abs=0.01)


def calibration_registers(cal: Calibration) -> tuple[bytes, bytes]:
    """Encode a calibration as the chip stores it (0x88..0xA1, 0xE1..0xE7)."""
    tp = struct.pack("<HhhHhhhhhhhh", cal.T1, cal.T2, cal.T3, *_p(cal)) + bytes([0, cal.H1])
    e4, e5, e6 = (cal.H4 >> 4) & 0xFF, (cal.H4 & 0x0F) | (cal.H5 & 0x0F) << 4, (cal.H5 >> 4) & 0xFF
    h = struct.pack("<hB", cal.H2, cal.H3) + bytes([e4, e5, e6, cal.H6 & 0xFF])
    return tp, h


def _p(cal: Calibration) -> list[int]:
    return [cal.P1, cal.P2, cal.P3, cal.P4, cal.P5, cal.P6, cal.P7, cal.P8, cal.P9]


def test_calibration_round_trip() -> None:
    """Decoding the register image gives back every parameter, signed nibbles included."""
    for cal in (EXAMPLE, Calibration(**_replace(H4=-300, H5=-7, H6=-12, H2=-5))):
        assert Calibration.from_registers(*calibration_registers(cal)) == cal


class FakeBus:
    """An emulated BME280 behind smbus2's SMBus API: registers, forced mode, faults.

    Attributes:
        regs: the 256 registers.
        writes: every (register, value) written, in order.
        fail: errno to raise on the next access (None = healthy).
        busy_polls: status reads that still report "measuring" after a trigger.
    """

    def __init__(self, chip_id: int = 0x60, address: int = 0x76) -> None:
        self.address = address
        self.regs = bytearray(256)
        self.regs[0xD0] = chip_id
        tp, h = calibration_registers(EXAMPLE)
        self.regs[0x88 : 0x88 + 26] = tp
        self.regs[0xE1 : 0xE1 + 7] = h
        self.regs[0xF7:0xFF] = bytes([0x80, 0, 0, 0x80, 0, 0, 0x80, 0])  # reset: no data
        self.writes: list[tuple[int, int]] = []
        self.fail: int | None = None
        self.busy_polls = 1
        self._busy = 0
        self.closed = False

    def _check(self, addr: int) -> None:
        if self.fail is not None:
            raise OSError(self.fail, errno.errorcode.get(self.fail, "error"))
        if addr != self.address:
            raise OSError(errno.EREMOTEIO, "Remote I/O error")

    def read_byte_data(self, i2c_addr: int, register: int) -> int:
        self._check(i2c_addr)
        if register == 0xF3:
            busy = self._busy > 0
            self._busy -= 1
            return 0x08 if busy else 0x00
        return self.regs[register]

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]:
        self._check(i2c_addr)
        return list(self.regs[register : register + length])

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None:
        self._check(i2c_addr)
        self.writes.append((register, value))
        self.regs[register] = value
        if register == 0xF4 and value & 0b11 == 0b01:  # forced mode: convert, back to sleep
            self.regs[0xF7:0xFA] = bytes([ADC_P >> 12, ADC_P >> 4 & 0xFF, (ADC_P & 0xF) << 4])
            self.regs[0xFA:0xFD] = bytes([ADC_T >> 12, ADC_T >> 4 & 0xFF, (ADC_T & 0xF) << 4])
            self.regs[0xFD:0xFF] = bytes([ADC_H >> 8, ADC_H & 0xFF])
            self.regs[0xF4] = value & ~0b11
            self._busy = self.busy_polls

    def close(self) -> None:
        self.closed = True


def make_driver(bus: FakeBus, **config: int) -> tuple[BME280Driver, list[float]]:
    """A driver on ``bus``, recording its sleeps instead of sleeping."""
    sleeps: list[float] = []

    def factory(_number: int) -> I2CBus:
        return bus

    driver = BME280Config(**config).driver(
        clock=fixed_clock, bus_factory=factory, sleep=sleeps.append
    )
    return driver, sleeps


def test_forced_measurement_reproduces_the_example() -> None:
    """A read triggers forced mode (ctrl_hum before ctrl_meas) and compensates the example."""
    bus = FakeBus()
    driver, sleeps = make_driver(bus)
    samples = {s.sensor: (s.value, s.unit) for s in driver.read()}
    assert samples["temperature"] == (25.08, "Cel")
    assert samples["pressure"] == (pytest.approx(100653.25, abs=0.01), "Pa")
    humidity = compensate_humidity(EXAMPLE, ADC_H, 128422) / 1024
    assert samples["humidity"] == (pytest.approx(humidity, abs=0.001), "%RH")
    registers = [reg for reg, _ in bus.writes]
    assert registers.index(REG_CTRL_HUM) < registers.index(REG_CTRL_MEAS)
    assert dict(bus.writes)[REG_CTRL_MEAS] == 0b001_001_01  # osrs_t x1, osrs_p x1, forced
    assert sleeps[0] == pytest.approx(0.0093)  # the datasheet's max time at x1
    assert len(sleeps) == 2  # one extra poll while the fake still reported "measuring"


def test_oversampling_and_prefix() -> None:
    """Oversampling x16 is written to both control registers; the prefix names the readings."""
    bus = FakeBus(address=0x77)
    driver, _ = make_driver(bus, address=0x77, oversampling=16)
    assert [s.sensor for s in driver.read()] == ["temperature", "humidity", "pressure"]
    assert (REG_CTRL_HUM, 0b101) in bus.writes
    assert (REG_CTRL_MEAS, 0b101_101_01) in bus.writes
    prefixed = BME280Config(prefix="outdoor").reading_names()
    assert prefixed == ["outdoor.temperature", "outdoor.humidity", "outdoor.pressure"]


def test_wrong_chip_names_what_was_found() -> None:
    """A BMP280 (chip id 0x58) is refused by name, and the bus is closed."""
    bus = FakeBus(chip_id=0x58)
    driver, _ = make_driver(bus)
    with pytest.raises(SensorError, match=r"chip id 0x58 \(BMP280\), expected 0x60"):
        driver.read()
    assert bus.closed


def test_no_device_at_address() -> None:
    """Nothing answering at the address is a SensorError about wiring."""
    driver, _ = make_driver(FakeBus(address=0x77))
    with pytest.raises(SensorError, match="address 0x76: no answer"):
        driver.read()


def test_io_error_closes_and_recovers() -> None:
    """An I/O error mid-read fails that read and closes the bus; the next read reopens it."""
    bus = FakeBus()
    driver, _ = make_driver(bus)
    driver.read()
    bus.fail = errno.EIO
    with pytest.raises(SensorError, match="no answer"):
        driver.read()
    assert bus.closed
    bus.fail = None
    assert len(driver.read()) == 3


def test_bus_cannot_be_opened() -> None:
    """A missing /dev/i2c-N says how to enable I2C."""

    def no_bus(number: int) -> I2CBus:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    driver = BME280Config().driver(bus_factory=no_bus)
    with pytest.raises(SensorError, match="dtparam=i2c_arm=on"):
        driver.read()


def test_measurement_that_never_finishes() -> None:
    """A chip stuck measuring fails the read instead of looping forever."""
    bus = FakeBus()
    bus.busy_polls = 1000
    driver, _ = make_driver(bus)
    with pytest.raises(SensorError, match="did not finish"):
        driver.read()


def test_skipped_measurement() -> None:
    """Data registers still at their reset value (0x80000) are not a reading."""
    bus = FakeBus()
    driver, _ = make_driver(bus)
    original = bus.write_byte_data
    bus.write_byte_data = lambda a, r, v: original(a, r, v & ~0b11 if r == 0xF4 else v)  # type: ignore[method-assign]
    with pytest.raises(SensorError, match="skipped"):
        driver.read()


def test_address_must_be_a_bme280_address() -> None:
    """Only 0x76 and 0x77 are accepted."""
    with pytest.raises(ConfigError, match="0x76"):
        BME280Config(address=0x40)


def test_smbus2_fits_the_bus_protocol() -> None:
    """smbus2.SMBus has every method the driver calls, with the same parameters."""
    bus: I2CBus = smbus2.SMBus()  # no bus opened
    for method in ("read_byte_data", "read_i2c_block_data", "write_byte_data", "close"):
        assert callable(getattr(bus, method))

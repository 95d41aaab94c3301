"""Bosch BME280 temperature, humidity and pressure sensor over I²C (smbus2).

Each read is one forced-mode measurement: write the oversampling settings (``ctrl_hum`` 0xF2,
then ``ctrl_meas`` 0xF4, which starts the conversion), wait the datasheet's maximum measurement
time, poll ``status`` 0xF3 until the chip is idle, burst-read the eight data registers
0xF7..0xFE, and compensate the raw values with the chip's own calibration (0x88..0xA1,
0xE1..0xE7, read once after the chip id 0x60 at 0xD0 is checked).

Compensation is the datasheet's integer code (BME280 datasheet section 4.2.3; 32-bit for
temperature and humidity, 64-bit for pressure), with C's truncating division reproduced; the
double-precision formulas of its section 8.1 are here too, as an independent check. smbus2 is
imported only when a BME280 is configured and first read (``pip install 'iotpipe[pi]'``).
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from edge.sensors.base import DriverConfig, Sample, SensorError, WallClock, wall_ms
from iotpipe.schema import setting

CHIP_ID = 0x60
#: Other Bosch chips answering at 0x76/0x77, to name what was found instead.
OTHER_CHIPS = {0x55: "BMP180", 0x56: "BMP280", 0x57: "BMP280", 0x58: "BMP280", 0x61: "BME680"}

REG_CALIB_TP = 0x88  # 0x88..0xA1: dig_T1..dig_P9, (0xA0 unused), dig_H1
REG_CHIP_ID = 0xD0
REG_CALIB_H = 0xE1  # 0xE1..0xE7: dig_H2..dig_H6
REG_CTRL_HUM = 0xF2
REG_STATUS = 0xF3
REG_CTRL_MEAS = 0xF4
REG_CONFIG = 0xF5
REG_DATA = 0xF7  # press_msb, lsb, xlsb, temp_msb, lsb, xlsb, hum_msb, lsb

_MODE_FORCED = 0b01
_STATUS_MEASURING = 0b1000
_OVERSAMPLING_CODE = {1: 1, 2: 2, 4: 3, 8: 4, 16: 5}
#: Data registers hold these when a measurement was skipped (or never ran).
_SKIPPED_20BIT = 0x80000
_SKIPPED_16BIT = 0x8000


class I2CBus(Protocol):
    """The part of ``smbus2.SMBus`` the driver uses (tests pass an emulated chip)."""

    def read_byte_data(self, i2c_addr: int, register: int) -> int:
        """One register."""
        ...

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]:
        """``length`` registers from ``register`` on."""
        ...

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None:
        """Write one register."""
        ...

    def close(self) -> None:
        """Close the bus device."""
        ...


#: Opens I²C bus number N (``/dev/i2c-N``).
BusFactory = Callable[[int], I2CBus]


def smbus2_bus(bus: int) -> I2CBus:
    """Open ``/dev/i2c-<bus>`` with smbus2, imported here so only BME280 users need it.

    Raises:
        SensorError: smbus2 is not installed.
        OSError: the bus device cannot be opened.
    """
    try:
        from smbus2 import SMBus
    except ImportError:
        raise SensorError("smbus2 is not installed: pip install 'iotpipe[pi]'") from None
    return SMBus(bus)


# -- compensation (pure) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Calibration:
    """The trimming parameters burnt into each chip (datasheet table 16 / section 4.2.2)."""

    T1: int
    T2: int
    T3: int
    P1: int
    P2: int
    P3: int
    P4: int
    P5: int
    P6: int
    P7: int
    P8: int
    P9: int
    H1: int = 0
    H2: int = 0
    H3: int = 0
    H4: int = 0
    H5: int = 0
    H6: int = 0

    @classmethod
    def from_registers(cls, tp: bytes, h: bytes) -> Calibration:
        """Decode 0x88..0xA1 (26 bytes) and 0xE1..0xE7 (7 bytes)."""
        if len(tp) != 26 or len(h) != 7:
            raise ValueError("calibration needs 26 + 7 bytes")

        def u16(i: int) -> int:
            return tp[i] | tp[i + 1] << 8

        def s16(i: int) -> int:
            value = u16(i)
            return value - 0x10000 if value & 0x8000 else value

        def s8(byte: int) -> int:
            return byte - 0x100 if byte & 0x80 else byte

        # H4 and H5 are 12-bit values sharing the nibbles of 0xE5; their high bytes are signed.
        return cls(
            T1=u16(0),
            T2=s16(2),
            T3=s16(4),
            P1=u16(6),
            P2=s16(8),
            P3=s16(10),
            P4=s16(12),
            P5=s16(14),
            P6=s16(16),
            P7=s16(18),
            P8=s16(20),
            P9=s16(22),
            H1=tp[25],
            H2=s8(h[1]) << 8 | h[0],
            H3=h[2],
            H4=s8(h[3]) * 16 | (h[4] & 0x0F),
            H5=s8(h[5]) * 16 | (h[4] >> 4),
            H6=s8(h[6]),
        )


def _cdiv(a: int, b: int) -> int:
    """C's integer division: truncates toward zero (Python's ``//`` floors)."""
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def compensate_temperature(cal: Calibration, adc_t: int) -> tuple[int, int]:
    """Temperature in 0.01 °C and ``t_fine`` (datasheet ``BME280_compensate_T_int32``)."""
    var1 = (((adc_t >> 3) - (cal.T1 << 1)) * cal.T2) >> 11
    var2 = (((((adc_t >> 4) - cal.T1) * ((adc_t >> 4) - cal.T1)) >> 12) * cal.T3) >> 14
    t_fine = var1 + var2
    return (t_fine * 5 + 128) >> 8, t_fine


def compensate_pressure(cal: Calibration, adc_p: int, t_fine: int) -> int:
    """Pressure in Pa as Q24.8 (divide by 256), 0 if uncalibrated (``..._P_int64``)."""
    var1 = t_fine - 128000
    var2 = var1 * var1 * cal.P6
    var2 = var2 + ((var1 * cal.P5) << 17)
    var2 = var2 + (cal.P4 << 35)
    var1 = ((var1 * var1 * cal.P3) >> 8) + ((var1 * cal.P2) << 12)
    var1 = (((1 << 47) + var1) * cal.P1) >> 33
    if var1 == 0:
        return 0  # the datasheet's guard against division by zero
    p = 1048576 - adc_p
    p = _cdiv(((p << 31) - var2) * 3125, var1)
    var1 = (cal.P9 * (p >> 13) * (p >> 13)) >> 25
    var2 = (cal.P8 * p) >> 19
    return ((p + var1 + var2) >> 8) + (cal.P7 << 4)


def compensate_humidity(cal: Calibration, adc_h: int, t_fine: int) -> int:
    """Relative humidity in %RH as Q22.10 (divide by 1024) (``..._H_int32``)."""
    v = t_fine - 76800
    a = (((adc_h << 14) - (cal.H4 << 20) - (cal.H5 * v)) + 16384) >> 15
    b = (
        (((((v * cal.H6) >> 10) * (((v * cal.H3) >> 11) + 32768)) >> 10) + 2097152) * cal.H2 + 8192
    ) >> 14
    v = a * b
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * cal.H1) >> 4)
    v = min(max(v, 0), 419430400)
    return v >> 12


def compensate_temperature_double(cal: Calibration, adc_t: int) -> tuple[float, int]:
    """Temperature in °C and ``t_fine`` (datasheet section 8.1, double precision)."""
    var1 = (adc_t / 16384.0 - cal.T1 / 1024.0) * cal.T2
    var2 = ((adc_t / 131072.0 - cal.T1 / 8192.0) * (adc_t / 131072.0 - cal.T1 / 8192.0)) * cal.T3
    return (var1 + var2) / 5120.0, int(var1 + var2)


def compensate_pressure_double(cal: Calibration, adc_p: int, t_fine: int) -> float:
    """Pressure in Pa (datasheet section 8.1, double precision); 0 if uncalibrated."""
    var1 = t_fine / 2.0 - 64000.0
    var2 = var1 * var1 * cal.P6 / 32768.0
    var2 = var2 + var1 * cal.P5 * 2.0
    var2 = var2 / 4.0 + cal.P4 * 65536.0
    var1 = (cal.P3 * var1 * var1 / 524288.0 + cal.P2 * var1) / 524288.0
    var1 = (1.0 + var1 / 32768.0) * cal.P1
    if var1 == 0.0:
        return 0.0
    p = 1048576.0 - adc_p
    p = (p - var2 / 4096.0) * 6250.0 / var1
    var1 = cal.P9 * p * p / 2147483648.0
    var2 = p * cal.P8 / 32768.0
    return p + (var1 + var2 + cal.P7) / 16.0


def compensate_humidity_double(cal: Calibration, adc_h: int, t_fine: int) -> float:
    """Relative humidity in %RH, clamped to 0..100 (datasheet section 8.1)."""
    var_h = t_fine - 76800.0
    var_h = (adc_h - (cal.H4 * 64.0 + cal.H5 / 16384.0 * var_h)) * (
        cal.H2 / 65536.0 * (1.0 + cal.H6 / 67108864.0 * var_h * (1.0 + cal.H3 / 67108864.0 * var_h))
    )
    var_h = var_h * (1.0 - cal.H1 * var_h / 524288.0)
    return min(100.0, max(0.0, var_h))


def measurement_time(t_os: int, p_os: int, h_os: int) -> float:
    """The datasheet's maximum forced-mode measurement time, seconds (appendix 9.1)."""
    return (1.25 + 2.3 * t_os + (2.3 * p_os + 0.575) + (2.3 * h_os + 0.575)) / 1000.0


# -- driver -----------------------------------------------------------------------------------


def _check_address(address: int) -> None:
    if address not in (0x76, 0x77):
        raise ValueError("must be 0x76 (118) or 0x77 (119)")


class BME280Config(DriverConfig):
    """``type = "bme280"``: temperature, humidity and pressure over I²C."""

    type: Literal["bme280"] = "bme280"
    interval: float = setting(30.0, "seconds between reads", ge=1.0, le=86_400.0)
    bus: int = setting(1, "I2C bus number (/dev/i2c-<bus>)", ge=0, le=255)
    address: int = setting(
        0x76, "I2C address: 0x76 (SDO to GND) or 0x77 (SDO to VCC)", check=_check_address
    )
    oversampling: Literal[1, 2, 4, 8, 16] = setting(
        1, "samples averaged per reading, for all three quantities"
    )

    def reading_names(self) -> list[str]:
        """temperature, humidity, pressure (with the prefix)."""
        return [self.reading(name) for name in ("temperature", "humidity", "pressure")]

    def driver(
        self,
        *,
        clock: WallClock = wall_ms,
        bus_factory: BusFactory = smbus2_bus,
        sleep: Callable[[float], None] = time.sleep,
    ) -> BME280Driver:
        """Build the driver (nothing is opened until the first read)."""
        return BME280Driver(self, clock=clock, bus_factory=bus_factory, sleep=sleep)


class BME280Driver:
    """One BME280 at one address; opens the bus and reads the calibration on first use."""

    def __init__(
        self,
        config: BME280Config,
        *,
        clock: WallClock = wall_ms,
        bus_factory: BusFactory = smbus2_bus,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._clock = clock
        self._bus_factory = bus_factory
        self._sleep = sleep
        self._bus: I2CBus | None = None
        self._calibration: Calibration | None = None
        self._where = f"I2C bus {config.bus} address {config.address:#04x}"

    @property
    def name(self) -> str:
        """The configured name."""
        return self.config.sensor_name

    @property
    def interval(self) -> float:
        """Seconds between reads."""
        return self.config.interval

    def _open(self) -> tuple[I2CBus, Calibration]:
        if self._bus is not None and self._calibration is not None:
            return self._bus, self._calibration
        addr = self.config.address
        try:
            bus = self._bus_factory(self.config.bus)
        except OSError as err:
            raise SensorError(
                f"cannot open /dev/i2c-{self.config.bus} ({err.strerror or err}; "
                "is dtparam=i2c_arm=on set?)"
            ) from None
        self._bus = bus
        chip = bus.read_byte_data(addr, REG_CHIP_ID)
        if chip != CHIP_ID:
            self.close()
            found = OTHER_CHIPS.get(chip, "an unknown chip")
            raise SensorError(
                f"{self._where}: chip id {chip:#04x} ({found}), expected {CHIP_ID:#04x} (BME280)"
            )
        tp = bytes(bus.read_i2c_block_data(addr, REG_CALIB_TP, 26))
        h = bytes(bus.read_i2c_block_data(addr, REG_CALIB_H, 7))
        calibration = Calibration.from_registers(tp, h)
        if calibration.T1 == 0 or calibration.P1 == 0:
            self.close()
            raise SensorError(f"{self._where}: calibration data is blank")
        self._calibration = calibration
        return bus, calibration

    def _measure(self, bus: I2CBus) -> tuple[int, int, int]:
        """One forced-mode measurement: the raw (adc_T, adc_P, adc_H)."""
        addr = self.config.address
        code = _OVERSAMPLING_CODE[self.config.oversampling]
        os_ = self.config.oversampling
        bus.write_byte_data(addr, REG_CTRL_HUM, code)  # takes effect at the ctrl_meas write
        bus.write_byte_data(addr, REG_CONFIG, 0)  # IIR filter off: one reading, no history
        bus.write_byte_data(addr, REG_CTRL_MEAS, code << 5 | code << 2 | _MODE_FORCED)
        wait = measurement_time(os_, os_, os_)
        self._sleep(wait)
        for _ in range(10):
            if not bus.read_byte_data(addr, REG_STATUS) & _STATUS_MEASURING:
                break
            self._sleep(wait / 4)
        else:
            raise SensorError(f"{self._where}: measurement did not finish")
        d = bus.read_i2c_block_data(addr, REG_DATA, 8)
        adc_p = d[0] << 12 | d[1] << 4 | d[2] >> 4
        adc_t = d[3] << 12 | d[4] << 4 | d[5] >> 4
        adc_h = d[6] << 8 | d[7]
        if _SKIPPED_20BIT in (adc_t, adc_p) or adc_h == _SKIPPED_16BIT:
            raise SensorError(f"{self._where}: measurement skipped (no data)")
        return adc_t, adc_p, adc_h

    def read(self) -> list[Sample]:
        """Measure once; any bus error closes the bus so the next read starts afresh."""
        try:
            bus, cal = self._open()
            adc_t, adc_p, adc_h = self._measure(bus)
        except OSError as err:
            self.close()
            if err.errno in (errno.EREMOTEIO, errno.ENXIO, errno.EIO):
                raise SensorError(
                    f"{self._where}: no answer ({err.strerror or err}; check wiring and address)"
                ) from None
            raise SensorError(f"{self._where}: {err.strerror or err}") from None
        centi, t_fine = compensate_temperature(cal, adc_t)
        pressure = compensate_pressure(cal, adc_p, t_fine) / 256.0
        humidity = compensate_humidity(cal, adc_h, t_fine) / 1024.0
        celsius = centi / 100.0
        if not -40.0 <= celsius <= 85.0 or not 30_000.0 <= pressure <= 110_000.0:
            raise SensorError(
                f"{self._where}: implausible reading {celsius:g} Cel, {pressure:g} Pa"
            )
        ts = self._clock()
        reading = self.config.reading
        return [
            Sample(reading("temperature"), celsius, "Cel", ts),
            Sample(reading("humidity"), round(humidity, 3), "%RH", ts),
            Sample(reading("pressure"), round(pressure, 2), "Pa", ts),
        ]

    def close(self) -> None:
        """Close the bus; the next read reopens it and rereads the calibration."""
        bus, self._bus, self._calibration = self._bus, None, None
        if bus is not None:
            with contextlib.suppress(OSError):  # closing a vanished bus must not mask the error
                bus.close()

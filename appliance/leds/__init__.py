"""Status LEDs: what the agent knows -> `LedState` -> `Pattern` -> LED drivers.

states.py is the pure half (`LedState`, `Pattern`, `pattern`, `LedFacts`,
`derive_state`): no I/O. drivers.py holds the drivers, which are thin: `GpioLed`
drives an LED on a BCM pin through gpiozero with an injected pin factory (tests
pass `MockFactory`), and `SysfsLed` drives a kernel LED such as the onboard ACT
LED through /sys/class/leds (tests pass a tmp root). `StatusLeds` owns the
drivers and shows a state's pattern on all of them.

An LED is cosmetic: nothing here may stop the agent routing traffic. Drivers raise
clear errors when built; `open_status_leds` and `StatusLeds` turn driver failures
into log lines and carry on with the LEDs that work.
"""

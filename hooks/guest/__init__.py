"""Service control in the guest: stop, start and verify services (services.py) and the
dead-man's switch that starts them again if snapcoord never comes back (watchdog.py)."""

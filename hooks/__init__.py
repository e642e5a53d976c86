"""Guest-side hooks: services, mysqldump, watchdog."""

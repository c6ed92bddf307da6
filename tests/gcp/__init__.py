"""Wire-level tests of the Google Cloud backends against local emulators."""

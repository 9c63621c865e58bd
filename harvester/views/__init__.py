"""Views over an output folder: console, status, report, verify. They read storage only."""

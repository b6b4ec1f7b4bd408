"""The data layer: a site's data file read and validated against its schema (``connector``), the
partitioners, and the bundled datasets' federation splits (``federation``) that deployed sites, the
coordinator and the simulation all use. It imports only the core (``fedgov``): README, Layout."""

"""The HTTP edge: error mapping, body limits and response headers shared by every route."""

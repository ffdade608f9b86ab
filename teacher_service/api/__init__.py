"""Internals of the online teacher endpoint; the app factory is `teacher_service.app.create_app`."""

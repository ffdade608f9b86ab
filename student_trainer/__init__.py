"""student_trainer."""

"""(placeholder: filled by the family work of issue 20)"""

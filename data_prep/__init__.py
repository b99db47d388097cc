"""visprune.data_prep: the data layer (LLaVA records, chat templates, processors, collation, the pre-flight
scan and prepared folders) and the synthetic toy and see-task data; it never imports visprune.trainer."""

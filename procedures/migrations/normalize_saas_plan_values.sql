-- Migration: bring the enumerated columns of an org's `saas_subscription_plans` table into canonical form
-- (lowercase status, billing_cycle, pricing_model and discount_type; uppercase currency; no stray spaces).
-- Plans imported from spreadsheets often carry `Active ` or `usd`; the cost procedures compare exact values.
--
-- Arguments: p_dataset (the org dataset, e.g. acme_local), p_dry_run (TRUE: change nothing).
-- Returns one row: dataset, dry_run, plans_to_change (rows that were, or in a dry run would be, changed).
-- Written without IF/WHILE (the emulator cannot run them inside procedure bodies): the UPDATE's WHERE
-- clause carries the dry-run switch instead.
CREATE OR REPLACE PROCEDURE `${project}.${dataset}.normalize_saas_plan_values`(p_dataset STRING, p_dry_run BOOL)
BEGIN
  DECLARE plans_to_change INT64;
  EXECUTE IMMEDIATE FORMAT("""
    SELECT COUNT(*) FROM `%s.saas_subscription_plans`
    WHERE status != LOWER(TRIM(status))
       OR billing_cycle != LOWER(TRIM(billing_cycle))
       OR pricing_model != LOWER(TRIM(pricing_model))
       OR IFNULL(discount_type, '') != LOWER(TRIM(IFNULL(discount_type, '')))
       OR currency != UPPER(TRIM(currency))""", p_dataset) INTO plans_to_change;
  EXECUTE IMMEDIATE FORMAT("""
    UPDATE `%s.saas_subscription_plans`
    SET status = LOWER(TRIM(status)),
        billing_cycle = LOWER(TRIM(billing_cycle)),
        pricing_model = LOWER(TRIM(pricing_model)),
        discount_type = LOWER(TRIM(discount_type)),
        currency = UPPER(TRIM(currency))
    WHERE NOT %s
      AND (status != LOWER(TRIM(status))
       OR billing_cycle != LOWER(TRIM(billing_cycle))
       OR pricing_model != LOWER(TRIM(pricing_model))
       OR IFNULL(discount_type, '') != LOWER(TRIM(IFNULL(discount_type, '')))
       OR currency != UPPER(TRIM(currency)))""", p_dataset, CAST(p_dry_run AS STRING));
  SELECT p_dataset AS dataset, p_dry_run AS dry_run, plans_to_change;
END

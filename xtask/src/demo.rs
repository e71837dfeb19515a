pub fn run(_duration: f64) -> anyhow::Result<()> {
    anyhow::bail!("demo: not written yet")
}

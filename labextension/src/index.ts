/**
 * jupyter-gpu-attach for JupyterLab 4: the GPU pool sidebar panel and the status-bar item.
 */
import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { GpuModel } from './model';
import { GpuPanel } from './panel';
import { GpuStatus } from './statusbar';

const GPU_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
  '<g class="jp-icon3" fill="#616161"><path d="M9 2h2v3H9zM13 2h2v3h-2zM9 19h2v3H9zM13 19h2v3h-2zM2 9h3v2H2zM2 13h3v2H2zM19 9h3v2h-3zM19 13h3v2h-3z"/>' +
  '<path d="M6 6h12v12H6zm2 2v8h8V8z"/><path d="M10 10h4v4h-4z"/></g></svg>';

export const gpuIcon = new LabIcon({ name: 'jupyter-gpu-attach:gpu', svgstr: GPU_SVG });

const OPEN = 'gpu-attach:open-panel';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-gpu-attach:plugin',
  description: 'GPU pool panel and status-bar item for jupyter-gpu-attach.',
  autoStart: true,
  optional: [ILabShell, INotebookTracker, IStatusBar, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    labShell: ILabShell | null,
    tracker: INotebookTracker | null,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null
  ) => {
    let panel: GpuPanel;
    let status: GpuStatus | null = null;
    const model = new GpuModel({
      isNeeded: () => panel?.isVisible || !!status?.isVisible
    });
    panel = new GpuPanel(model, tracker);
    panel.title.icon = gpuIcon;
    app.shell.add(panel, 'left', { rank: 900 });

    app.commands.addCommand(OPEN, {
      label: 'Show the GPU pool',
      icon: gpuIcon,
      execute: () => app.shell.activateById(panel.id)
    });
    palette?.addItem({ command: OPEN, category: 'GPU' });

    if (statusBar) {
      status = new GpuStatus(model, tracker, () => void app.commands.execute(OPEN));
      statusBar.registerStatusItem('jupyter-gpu-attach:status', {
        item: status,
        align: 'left',
        rank: 4,
        isActive: () => !!tracker?.currentWidget && labShell?.currentWidget === tracker.currentWidget
      });
      tracker?.currentChanged.connect(() => status?.update());
    }
    void model.refresh();
  }
};

export default plugin;
